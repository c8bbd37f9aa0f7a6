"""`ray up` for real: the on-prem config (clusters/onprem.yaml, `provider: local`) brings a head up
over SSH, `ray dashboard` port-forwards to it, a job runs through that tunnel with token
authentication, and `ray down` stops it.

The "machine" is this one: an sshd from Debian's openssh-server on 127.0.0.1 (a free port, given
to ssh through an ~/.ssh/config entry that is removed afterwards, since Ray's SSH runner has no
port option), a throwaway key pair, and a login HOME in a temp dir (sshd's SetEnv) so that
nothing Ray writes to the head's home (~/ray_bootstrap_config.yaml, ~/.ray/auth_token, ~/bertray)
touches the real one. The test templates only what must differ on a shared CI box from the
repository's file: the host and user, the key, free ports and a private --temp-dir, 0 workers,
and `pip install` made a dry run (it would otherwise rewrite this machine's environment). It
also drops `ray stop` from the start commands and gives the head's login shell a `ray` whose
`stop` stops only this cluster: on a dedicated node `ray stop` is right, here it would kill every
Ray process of the machine, including the cluster the other tests share.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import pathlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON_BIN = pathlib.Path(sys.executable).parent
MARKER = "# bertray ray-up test"

pytestmark = [pytest.mark.ray]


def _unavailable(reason: str):
    """Skip with the reason; under CI (where .ci/run installs the packages) that is a failure."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI installs openssh-server and rsync in .ci/run)")
    pytest.skip(reason)


def _tools() -> dict[str, str]:
    tools = {}
    for name, candidates in {"sshd": ["sshd", "/usr/sbin/sshd"], "ssh": ["ssh"], "ssh-keygen": ["ssh-keygen"],
                             "rsync": ["rsync"]}.items():
        found = next((shutil.which(c) for c in candidates if shutil.which(c)), None)
        if not found:
            _unavailable(f"{name} is not installed (Debian: apt-get install openssh-server openssh-client rsync)")
        tools[name] = found
    return tools


def _run(cmd, *, env, timeout, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


class SshConfigEntry:
    """Prepends `Host 127.0.0.1 / Port N` to the user's ssh config (ssh reads it from the passwd
    home, not $HOME) and puts the file back exactly as it was."""

    def __init__(self, port: int):
        self.dir = pathlib.Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
        self.path = self.dir / "config"
        self.port = port
        self.had_dir = self.dir.exists()
        self.original = self.path.read_bytes() if self.path.exists() else None
        self.mode = self.path.stat().st_mode if self.path.exists() else None

    def __enter__(self):
        self.dir.mkdir(mode=0o700, exist_ok=True)
        entry = f"{MARKER} (removed when it ends)\nHost 127.0.0.1\n    Port {self.port}\n\n".encode()
        self.path.write_bytes(entry + (self.original or b""))
        os.chmod(self.path, 0o600)
        return self

    def __exit__(self, *exc):
        if self.original is None:
            self.path.unlink(missing_ok=True)
            if not self.had_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self.path.write_bytes(self.original)
            os.chmod(self.path, self.mode & 0o7777)


def _start_sshd(kit, tools, root: pathlib.Path) -> tuple[subprocess.Popen, int]:
    port = kit.free_port()
    home = root / "home"
    _run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], env=None, timeout=30)
    _run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id_ed25519")], env=None, timeout=30)
    shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\nAuthorizedKeysFile {root}/authorized_keys\n"
        f"PidFile {root}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSetEnv HOME={home}\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # Debian's privilege-separation dir
    check = subprocess.run([tools["sshd"], "-t", "-f", str(root / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        _unavailable(f"sshd rejects its test config: {check.stderr.strip()}")
    proc = subprocess.Popen([tools["sshd"], "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=open(root / "sshd.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while True:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                _unavailable(f"sshd did not start (not root?): {(root / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.2)


def _head_home(root: pathlib.Path, ray_temp: pathlib.Path) -> None:
    """The SSH login's HOME: a .bashrc that finds this Python's `ray`, with `ray stop` scoped to
    the test cluster (its --temp-dir)."""
    home, bindir = root / "home", root / "bin"
    home.mkdir()
    bindir.mkdir()
    wrapper = bindir / "ray"
    wrapper.write_text(
        "#!/bin/sh\n# `ray stop` stops only the test cluster's processes (found by its --temp-dir)\n"
        f'if [ "$1" = "stop" ]; then exec {shlex.quote(sys.executable)} '
        f'{shlex.quote(str(REPO / "tests" / "clusters" / "conftest.py"))} --stop {shlex.quote(str(ray_temp))}; fi\n'
        f'exec {shlex.quote(str(PYTHON_BIN / "ray"))} "$@"\n')
    wrapper.chmod(0o755)
    (home / ".bashrc").write_text(
        f'case ":$PATH:" in *":{bindir}:"*) ;; *) export PATH="{bindir}:{PYTHON_BIN}:$PATH" ;; esac\n'
        f'export RAY_TMPDIR="{root}/tmp" RAY_USAGE_STATS_ENABLED=0\n')
    (root / "tmp").mkdir()


def _templated_config(kit, root: pathlib.Path, ray_temp: pathlib.Path, token_file: pathlib.Path) -> tuple[dict, dict]:
    """clusters/onprem.yaml with the loopback host, the throwaway key, free ports."""
    config = yaml.safe_load((REPO / "clusters" / "onprem.yaml").read_text())
    names = ("gcs", "dashboard", "metrics", "client", "agent_http", "agent_grpc", "runtime_env", "node_manager",
             "object_manager")
    ports = dict(zip(names, kit.free_ports(len(names))))
    config["cluster_name"] = f"bertray-ci-{uuid.uuid4().hex[:8]}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(root / "id_ed25519")}
    config["min_workers"] = config["max_workers"] = 0
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    config["file_mounts"]["~/.ray/auth_token"] = str(token_file)        # "your" token, from the client's home
    config["setup_commands"] = [re.sub(r"pip install (-q )?", "pip install -q --dry-run --no-deps --no-index "
                                       "--no-build-isolation ", c) for c in config["setup_commands"]]
    extra = (f" --port={ports['gcs']} --dashboard-port={ports['dashboard']} --metrics-export-port={ports['metrics']}"
             f" --ray-client-server-port={ports['client']} --dashboard-agent-listen-port={ports['agent_http']}"
             f" --dashboard-agent-grpc-port={ports['agent_grpc']} --runtime-env-agent-port={ports['runtime_env']}"
             f" --node-manager-port={ports['node_manager']} --object-manager-port={ports['object_manager']}"
             f" --temp-dir={ray_temp} --num-cpus=1 --num-gpus=0")
    starts = [c for c in config["head_start_ray_commands"] if c.strip() != "ray stop"]
    assert any("ray start --head" in c for c in starts)
    config["head_start_ray_commands"] = [c + extra if "ray start --head" in c else c for c in starts]
    config["worker_start_ray_commands"] = [c for c in config["worker_start_ray_commands"] if c.strip() != "ray stop"]
    return config, ports


@pytest.mark.timeout(420)
def test_ray_up_onprem_config_over_ssh(kit):
    tools = _tools()
    root = pathlib.Path(tempfile.mkdtemp(prefix="bertray-rayup-"))
    ray_temp = root / "ray"
    sshd = dashboard = None
    cluster_name = None
    timings: dict[str, float] = {}
    try:
        _head_home(root, ray_temp)
        sshd, ssh_port = _start_sshd(kit, tools, root)
        # The user's side: their own HOME with the token `ray get-auth-token --generate` wrote.
        client_home = root / "client_home"
        client_home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}}
        env.update(HOME=str(client_home), RAY_TMPDIR=str(root / "tmp"), TMPDIR=str(root / "tmp"),
                   RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   PATH=f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}")
        token = _run([kit.ray_cli(), "get-auth-token", "--generate"], env=env, timeout=60).stdout.strip()
        token_file = client_home / ".ray" / "auth_token"
        assert token_file.read_text().strip() == token

        config, ports = _templated_config(kit, root, ray_temp, token_file)
        cluster_name = config["cluster_name"]
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(config))
        cfg = root / "cluster.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))

        with SshConfigEntry(ssh_port):
            t0 = time.perf_counter()
            up = _run([kit.ray_cli(), "up", "-y", "--no-config-cache", str(cfg)], env=env, timeout=300)
            timings["ray up"] = time.perf_counter() - t0
            assert "Ray runtime started" in up.stdout + up.stderr or kit.processes_of(str(ray_temp)), up.stdout[-3000:]
            # What `ray up` did on the head: the checkout (filtered), the token, the bootstrap config.
            head_home = root / "home"
            assert (head_home / "bertray" / "flows" / "pretrain.py").is_file()
            assert not (head_home / "bertray" / "runs").exists(), "rsync_filter let runs/ through"
            assert (head_home / ".ray" / "auth_token").read_text().strip() == token
            assert (head_home / "ray_bootstrap_config.yaml").is_file()
            assert "export RAY_AUTH_MODE=token" in (head_home / ".bashrc").read_text()
            # The documented way to read the token of a running cluster.
            shown = _run([kit.ray_cli(), "exec", "--no-config-cache", str(cfg), "ray get-auth-token"], env=env,
                         timeout=120)
            assert token in shown.stdout

            # `ray dashboard <config>`: SSH port-forward to the head's loopback-only dashboard.
            local_port = kit.free_port()
            dashboard = subprocess.Popen([kit.ray_cli(), "dashboard", "--no-config-cache", "--port", str(local_port),
                                          "--remote-port", str(ports["dashboard"]), str(cfg)], cwd=REPO, env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{local_port}"
            kit.wait_http(url + "/api/version", token, timeout=60)
            assert kit.http_get(url + "/api/jobs/")[0] == 401            # token authentication is on
            assert kit.http_get(url + "/api/jobs/", token)[0] == 200

            # A job through the tunnel, the code shipped with --working-dir.
            job_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_API_SERVER_ADDRESS=url)
            sid = f"rayup-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            script = ("import bertray, ray; ray.init(); "
                      "print('BERTRAY_FROM', bertray.__file__); "
                      "print('ANSWER', ray.get(ray.remote(lambda: 6 * 7).remote()))")
            job = _run([kit.ray_cli(), "job", "submit", "--submission-id", sid, "--working-dir", ".",
                        "--runtime-env", "clusters/runtime_env.yaml", "--", "python", "-c", script],
                       env=job_env, timeout=240)
            timings["job"] = time.perf_counter() - t0
            assert f"Job '{sid}' succeeded" in job.stdout + job.stderr
            assert "ANSWER 42" in job.stdout
            shipped = re.search(r"BERTRAY_FROM (\S+)", job.stdout).group(1)
            assert "working_dir_files" in shipped and str(REPO) not in shipped, shipped

            dashboard.terminate()
            dashboard.wait(timeout=30)
            dashboard = None

            # `ray down`: stops Ray on the head (its `ray stop`) and releases the node.
            t0 = time.perf_counter()
            down = _run([kit.ray_cli(), "down", "-y", str(cfg)], env=env, timeout=180)
            timings["ray down"] = time.perf_counter() - t0
            deadline = time.time() + 30
            while kit.processes_of(str(ray_temp)) and time.time() < deadline:
                time.sleep(1)
            assert not kit.processes_of(str(ray_temp)), f"Ray still runs after ray down:\n{down.stdout[-3000:]}"
            try:
                kit.http_get(f"http://127.0.0.1:{ports['dashboard']}/api/version", timeout=3)
                pytest.fail("the head's dashboard still answers after ray down")
            except OSError:
                pass
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
    finally:
        if dashboard is not None:
            dashboard.kill()
            dashboard.wait(timeout=10)
        kit.stop_cluster(str(ray_temp))
        if sshd is not None:
            # ssh clients first (their sessions end and sshd reaps them), then sshd itself
            server = {sshd.pid} | {p for p in kit.processes_of(f"-f {root}/sshd_config")}
            kit.kill_processes(kit.processes_of(str(root)) - server)
            sshd.terminate()
            try:
                sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sshd.kill()
        kit.stop_cluster(str(root))          # ssh control masters and anything else naming the temp dir
        if cluster_name:
            # Ray's SSH control sockets: /tmp/ray_ssh_<user hash>/<cluster hash>
            user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
            shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{hashlib.sha256(cluster_name.encode()).hexdigest()[:10]}",
                          ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(f"/tmp/ray_ssh_{user_hash}")      # only if no other cluster uses it
        shutil.rmtree(root, ignore_errors=True)
