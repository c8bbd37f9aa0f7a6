"""No credential is ever written: not in the run's files, not on the console, not in Ray's logs.

Caught on the code before this test: `data.storage_options` took `key`/`secret`, and the whole
config went into the loop config, every pickled read task and `bertray_state.json` of every
checkpoint; a URL with user:password was echoed in errors, logs, block metadata and the run state."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from bertray.config import from_mapping
from bertray.train.config import PretrainConfig
from bertray.errors import ConfigError
from bertray.storage import credential_keys, redact_url

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_redaction_and_credential_keys():
    assert redact_url("s3://AKID:sEcReT@bucket/corpus/") == "s3://***@bucket/corpus/"
    assert redact_url("https://user:pw@host:8080/x?y=1") == "https://***@host:8080/x?y=1"
    assert redact_url("s3://bucket/a@b.txt") == "s3://bucket/a@b.txt"          # an @ in a key is no userinfo
    assert credential_keys({"anon": False, "client_kwargs": {"endpoint_url": "http://x", "aws_secret_access_key": "s"},
                            "key": "k"}) == ["client_kwargs.aws_secret_access_key", "key"]


@pytest.mark.parametrize("section,values", [
    ("data", {"corpus": ["s3://AKID:sEcReT@bucket/corpus/"]}),
    ("data", {"corpus": ["c.txt"], "eval_corpus": ["gs://u:sEcReT@b/heldout/"]}),
    ("data", {"corpus": ["c.txt"], "storage_options": {"key": "AKID", "secret": "sEcReT"}}),
    ("run", {"output": "https://u:sEcReT@host/runs"}),
    ("model", {"init_from": "s3://AKID:sEcReT@bucket/ckpt"}),
])
def test_credentials_in_the_config_are_refused_without_echoing_them(section, values):
    mapping = {"data": {"corpus": ["c.txt"]}, section: values} if section != "data" else {"data": values}
    with pytest.raises(ConfigError) as err:
        from_mapping(PretrainConfig, mapping)
    assert "sEcReT" not in str(err.value) and "environment" in str(err.value)


def _run_flow(args: list[str], env_secret: str, ray_tmp: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": env_secret, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "local",
           "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "flows/pretrain.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _files_containing(root: str, secret: str) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    if secret.encode() in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_run_on_object_storage_writes_no_credential(s3_bucket, tmp_path):
    """Credentials in the environment (as on a laptop; nodes use instance roles): the loopback-S3
    pipeline runs, and the secret appears in no file the run wrote, not on the console, and not in
    Ray's session logs. A credentialed URL is refused up front, redacted."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(REPO / "samples" / "corpus" / "wikitext-2" / "wiki.test.raw"), f"{s3_bucket}/corpus/wiki.test.raw")
    secret = f"sEcReT{uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="brs-", dir="/tmp")     # short: Ray's socket paths must fit 107 bytes
    output = tmp_path / "runs"
    try:
        run = _run_flow(["--corpus", f"s3://{s3_bucket}/corpus/", "--output", str(output), "--name", "secrets",
                         "--num-cpus", "2", "--train.max_steps", "4", "--train.log_every", "2", "--train.eval_every",
                         "0", "--train.eval_batches", "1", "--train.checkpoint_every", "4"], secret, ray_tmp)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert (output / "secrets" / "checkpoint_00000004" / "bertray_state.json").is_file()
        assert secret not in run.stdout + run.stderr
        assert _files_containing(str(output), secret) == []
        assert _files_containing(ray_tmp, secret) == []

        url_secret = f"uRlSeCrEt{uuid.uuid4().hex}"
        refused = _run_flow(["--corpus", f"s3://AKIDEXAMPLE:{url_secret}@{s3_bucket}/corpus/", "--output",
                             str(output), "--name", "refused"], secret, ray_tmp, timeout=120)
        assert refused.returncode == 2 and "credentials in a URL are refused" in refused.stderr
        assert url_secret not in refused.stdout + refused.stderr and "s3://***@" in refused.stderr
        assert _files_containing(str(output), url_secret) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
