"""`benchmarks/gpu_check.sh --dry-run`: the GPU measurement's code path on CPU (tiny model, 20 steps),
so the script cannot rot before a GPU runs it: every part writes its numbers and the summary has them."""

import json
import os
import pathlib
import subprocess

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_measures_every_part(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    whats = [row["what"] for row in summary["rows"]]
    for part in ("step s128", "step s512", "fp16", "lamb", "model step", "s512", "fine-tune step SST-2",
                 "optimizer step tiny lamb multi-tensor", "Ray Train pretraining"):
        assert any(part in what for what in whats), (part, whats)
    assert all(row["sequences_per_s"] > 0 for row in summary["rows"] if not row["what"].startswith("optimizer"))
    assert summary["pretraining"]["steps"] == 20 and 0 <= summary["pretraining"]["data_wait_share"] < 1
    assert "== gpu_check on cpu" in run.stdout and "DRY RUN" in run.stdout
