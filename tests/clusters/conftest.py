"""Helpers for the cluster tests: a private Ray head on loopback, found and stopped by its own
temp dir, and an SSH server on loopback for `ray up`.

Why not `ray stop`: it kills every Ray process on the machine, including the `ray.init` cluster
that other tests of the same session share (tests/conftest.py) and anybody else's. A head started
here has its own ports and its own `--temp-dir`, so its `ray_current_cluster` file lands in that
directory (never /tmp/ray) and `ray.init()` elsewhere cannot be redirected to it. It is stopped by
sending signals to exactly the processes whose command line names that temp dir, and to their
descendants (the dashboard's module processes, the agents, the workers, the job drivers).
RAY_ADDRESS / RAY_API_SERVER_ADDRESS / the auth variables are only ever put into the environment
of child processes, never into this process's `os.environ`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON_BIN = pathlib.Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def ray_cli() -> str:
    """The `ray` script of the interpreter running the tests (never a shim found on PATH)."""
    exe = PYTHON_BIN / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Processes, by /proc (no psutil needed)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        out[int(entry)] = (ppid, cmdline)
    return out


def processes_of(marker: str) -> set[int]:
    """Processes whose command line contains `marker`, plus all their descendants."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found - {os.getpid()}
        grew = bool(children)
        found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def kill_processes(pids: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL: only these pids."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return


def stop_cluster(temp_dir: str | os.PathLike) -> None:
    """Stop the Ray processes of the cluster whose `--temp-dir` is temp_dir (and nothing else)."""
    marker = str(temp_dir)
    for _ in range(3):        # workers forked while we were stopping the first round
        pids = processes_of(marker)
        if not pids:
            return
        kill_processes(pids)


# --------------------------------------------------------------------------------------------
# HTTP against the dashboard (urllib: no client-side Ray auth state involved)


def http_get(url: str, token: str | None = None, header: str = "Authorization", timeout: float = 30.0):
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header(header, f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def wait_http(url: str, token: str | None = None, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            status, _ = http_get(url, token, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# A private head on loopback


@dataclass
class LocalHead:
    """`ray start --head` on its own ports and temp dir, dashboard bound to 127.0.0.1."""

    root: pathlib.Path
    num_cpus: int = 2
    token_auth: bool = True
    ports: dict[str, int] = field(default_factory=dict)
    token: str | None = None
    started_s: float = 0.0

    @property
    def temp_dir(self) -> pathlib.Path:
        return self.root / "ray"

    @property
    def home(self) -> pathlib.Path:
        return self.root / "home"

    @property
    def token_path(self) -> pathlib.Path:
        return self.root / "auth_token"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def env(self, *, auth: bool = True) -> dict[str, str]:
        """Environment for the head and for clients of it (CLI, job submission)."""
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        env.update(HOME=str(self.home), RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
                   PATH=f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}",   # the entrypoint's `python`
                   RAY_API_SERVER_ADDRESS=self.dashboard_url)
        if self.token_auth and auth:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def start(self) -> "LocalHead":
        self.home.mkdir(parents=True, exist_ok=True)
        names = ("gcs", "dashboard", "metrics", "client", "agent_http", "agent_grpc", "runtime_env",
                 "node_manager", "object_manager")
        self.ports = dict(zip(names, free_ports(len(names))))
        env = self.env()
        if self.token_auth:
            # What a user does once: `ray get-auth-token --generate` writes ~/.ray/auth_token.
            # (RAY_AUTH_TOKEN_PATH must not name a missing file then: Ray aborts on that.)
            gen_env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
            out = subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=gen_env, capture_output=True,
                                 text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"ray get-auth-token --generate failed:\n{out.stdout}\n{out.stderr}")
            self.token = out.stdout.strip()
            shutil.copy(self.home / ".ray" / "auth_token", self.token_path)
        p = self.ports
        cmd = [ray_cli(), "start", "--head", f"--port={p['gcs']}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={p['dashboard']}", f"--metrics-export-port={p['metrics']}",
               f"--ray-client-server-port={p['client']}", f"--dashboard-agent-listen-port={p['agent_http']}",
               f"--dashboard-agent-grpc-port={p['agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env']}",
               f"--node-manager-port={p['node_manager']}", f"--object-manager-port={p['object_manager']}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        wait_http(self.dashboard_url + "/api/version", self.token, timeout=60)
        self.started_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        stop_cluster(self.temp_dir)

    def api(self, path: str):
        status, body = http_get(self.dashboard_url + path, self.token)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]}"
        return json.loads(body)

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def session_logs(self) -> pathlib.Path:
        return self.temp_dir / "session_latest" / "logs"


def newest_log_lines(head: LocalHead, pattern: str = "*", lines: int = 40) -> str:
    """The tails of the head's log files matching pattern, for assertion messages."""
    out = []
    for path in sorted(head.session_logs().glob(pattern))[-6:]:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(out)


@pytest.fixture(scope="module")
def local_head():
    """A private head with token authentication on (as the repo's cluster configs run it)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="bertray-head-"))
    head = LocalHead(root)
    try:
        head.start()
        yield head
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def kit():
    """This module's helpers for the test modules (with --import-mode=importlib a test module
    cannot `import conftest`)."""
    import types

    return types.SimpleNamespace(**{k: v for k, v in globals().items() if not k.startswith("_")})


if __name__ == "__main__":
    # `python tests/clusters/conftest.py --stop <temp dir>`: the scoped `ray stop` that the `ray up`
    # test's head node runs instead of the machine-wide one.
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--stop", required=True, help="stop the Ray processes naming this temp dir")
    stop_cluster(parser.parse_args().stop)
