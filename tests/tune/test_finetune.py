"""The sweep on Ray Tune (flows/finetune.py -> bertray.tune.sweep): grid construction, trial
resources, checkpoint resolution, and real Tune runs on the local 2-CPU cluster with a failing trial."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pathlib

import pytest

from bertray.config import load_config
from bertray.errors import CheckpointError, ConfigError
from bertray.tasks.registry import TASKS, resolve_tasks
from bertray.tune import sweep as ft
from bertray.tune import sweep_plan as plan
from bertray.tune.sweep_plan import FinetuneConfig

REPO = pathlib.Path(__file__).resolve().parents[2]


def _flow():
    spec = importlib.util.spec_from_file_location("finetune_flow", REPO / "flows" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Pure parts


def test_default_grid_is_the_papers_and_flags_override_it():
    cfg = FinetuneConfig(tasks="mrpc,squad2", seeds=(0, 1))
    assert cfg.grid(TASKS["mrpc"]) == [{"learning_rate": lr, "batch_size": 32, "epochs": 3, "seed": s}
                                       for lr in (5e-5, 4e-5, 3e-5, 2e-5) for s in (0, 1)]
    assert cfg.grid(TASKS["squad2"]) == [{"learning_rate": 5e-5, "batch_size": 48, "epochs": 2, "seed": s}
                                         for s in (0, 1)]
    small = FinetuneConfig(tasks="mrpc", learning_rates=(1e-4,), batch_sizes=(16, 32), epochs=(1,))
    assert [(p["batch_size"], p["epochs"]) for p in small.grid(TASKS["mrpc"])] == [(16, 1), (32, 1)]


def test_config_is_validated_at_the_edge():
    with pytest.raises(ConfigError, match="unknown task 'sst3'"):
        FinetuneConfig(tasks="sst3")
    with pytest.raises(ConfigError, match="learning_rates"):
        FinetuneConfig(learning_rates=(0.0,))
    with pytest.raises(ConfigError, match="max_seq_len"):
        FinetuneConfig(max_seq_len=4)
    with pytest.raises(ConfigError, match="fail_trials"):
        FinetuneConfig(fail_trials=("sst2@fast",))
    for names in ({"labels": ("..",)}, {"labels": ("a/../b",)}, {"name": ".."}, {"name": "a/b"}):
        with pytest.raises(ConfigError, match="must be a folder name"):     # nothing climbs out of the output
            FinetuneConfig(**names)
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        load_config(FinetuneConfig, None, {"lr": [1e-4]})
    for name in ("finetune-embedded.yaml", "finetune-paper.yaml"):      # the shipped configs load
        load_config(FinetuneConfig, str(REPO / "flows" / "configs" / name), {})


def test_trials_carry_the_row_grid_point_and_fault_injection(tmp_path):
    cfg = FinetuneConfig(tasks="sst2,mrpc", learning_rates=(1e-4, 3e-5), batch_sizes=(32,), epochs=(2,),
                         seeds=(0, 7), fail_trials=("mrpc@3e-5",), max_seq_len=64)
    rows = [plan.Row("ckpt", "/c"), plan.Row(plan.RANDOM_INIT, "/c", random_init=True)]
    trials = plan.trial_configs(cfg, rows, resolve_tasks(cfg.tasks), cache_dir="/cache", threads=2)
    assert len(trials) == 2 * 2 * 2 * 2
    failing = [t for t in trials if t["trial"]["fail"]]
    assert len(failing) == 2 * 2 and {t["trial"]["task"] for t in failing} == {"mrpc"}
    assert {t["trial"]["learning_rate"] for t in failing} == {3e-5}
    first = trials[0]["trial"]
    assert first["data"] == str(REPO / "samples") or first["data"].endswith("samples")   # made absolute
    assert first["max_seq_len"] == 64 and first["threads"] == 2 and first["cache_dir"] == "/cache"
    assert [t["trial"]["random_init"] for t in trials].count(True) == 8
    # ASHA's groups: one per (row, task), in sweep order, each with only its own trials
    groups = ft._groups(trials)
    assert list(groups) == [("ckpt", "sst2"), ("ckpt", "mrpc"), (plan.RANDOM_INIT, "sst2"), (plan.RANDOM_INIT, "mrpc")]
    for (row, task), members in groups.items():
        assert len(members) == 4 and all(t["row"] == row and t["trial"]["task"] == task for t in members)


@pytest.mark.parametrize("cluster,kw,expected", [
    ({"CPU": 2.0}, {}, {"cpu": 1.0, "gpu": 0.0}),
    ({"CPU": 16.0, "GPU": 2.0}, {}, {"cpu": 8.0, "gpu": 1.0}),
    ({"CPU": 64.0, "GPU": 8.0}, {}, {"cpu": 8.0, "gpu": 1.0}),
    ({"CPU": 8.0, "GPU": 4.0}, {"cpus_per_trial": 1.0}, {"cpu": 1.0, "gpu": 1.0}),
    ({"CPU": 8.0}, {"cpus_per_trial": 4.0}, {"cpu": 4.0, "gpu": 0.0}),
])
def test_one_gpu_per_trial_when_the_cluster_has_gpus(cluster, kw, expected):
    assert plan.trial_resources(FinetuneConfig(**kw), cluster) == expected


def test_more_resources_than_the_cluster_has_is_an_error():
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        plan.trial_resources(FinetuneConfig(gpus_per_trial=1.0), {"CPU": 2.0})


def test_rows_follow_run_directories_and_reject_non_checkpoints(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint_00000200").mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        (run / "checkpoint_00000200" / f.name).write_bytes(f.read_bytes())
    (run / "latest").write_text("checkpoint_00000200\n")
    for given in (run, run / "latest"):
        cfg = FinetuneConfig(init_from=(str(given),), random_init=True)
        rows = plan.resolve_rows(cfg)
        assert [r.label for r in rows] == ["run/checkpoint_00000200", "random init"]
        assert rows[0].checkpoint == str(run / "checkpoint_00000200") and rows[1].random_init
    with pytest.raises(CheckpointError, match="has no config.json") as error:
        plan.resolve_rows(FinetuneConfig(init_from=(str(tmp_path),)))
    assert "pretrain.py" not in str(error.value)


def test_the_default_checkpoint_missing_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="python flows/pretrain.py"):
        plan.resolve_rows(FinetuneConfig())


def test_flow_flags_map_onto_the_config():
    flow = _flow()
    args = flow.build_parser().parse_args(["--lr", "5e-5", "3e-5", "--restarts", "3", "--random-init", "--tasks",
                                           "glue", "--max-seq-len", "64", "--no-predictions", "--scheduler", "asha"])
    assert flow.overrides_from(args) == {"learning_rates": [5e-5, 3e-5], "seeds": [0, 1, 2], "random_init": True,
                                         "tasks": "glue", "max_seq_len": 64, "predictions": False,
                                         "scheduler": "asha"}
    for given, seeds in ((["--seed", "42"], [42]), (["--seeds", "42"], [42]), (["--seeds", "0", "42"], [0, 42])):
        assert flow.overrides_from(flow.build_parser().parse_args(given)) == {"seeds": seeds}   # seeds, as named
    for wrong, message in ((["--seed", "1", "--restarts", "2"], "not both"), (["--restarts", "0"], "at least 1")):
        with pytest.raises(ConfigError, match=message):
            flow.overrides_from(flow.build_parser().parse_args(wrong))


def test_flow_without_a_pretraining_checkpoint_says_how_to_make_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flow = _flow()
    monkeypatch.setattr("bertray.cli.REPO", tmp_path)    # no runs/ in the repository either
    assert flow.main(["--output", str(tmp_path / "out")]) == 2
    assert "python flows/pretrain.py" in capsys.readouterr().err


def test_each_sweep_has_its_own_folder_and_latest_names_the_newest(tmp_path, s3_bucket):
    """A second sweep into the same output leaves the first one's folder alone; `latest` moves
    (a link on a local disk, a one-line file in object storage)."""
    for output in (str(tmp_path / "out"), f"s3://{s3_bucket}/sweeps"):
        for name in ("finetune-1", "finetune-2"):
            tables = f"{output}/{name}/results.md"
            fs, path = __import__("fsspec").core.url_to_fs(tables)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, name.encode())
            plan.point_latest(output, name)
            assert plan.latest_sweep(output) == plan.absolute_url(f"{output}/{name}")
        assert fs.cat_file(f"{path.rsplit('/', 2)[0]}/finetune-1/results.md") == b"finetune-1"
    assert (tmp_path / "out" / "latest").is_symlink() and (tmp_path / "out" / "latest" / "results.md").read_text() == \
        "finetune-2"


def test_a_truncated_checkpoint_fails_the_flow_in_one_line_before_ray_starts(tiny_checkpoint, tmp_path, capsys,
                                                                               monkeypatch):
    """What every trial would read is checked once on the driver: a `model.safetensors` cut short
    (an interrupted copy) ends the flow with exit 2 and one line naming the file, before Ray starts."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    started = []
    monkeypatch.setattr("bertray.cli.start_ray", lambda *a, **k: started.append(a))
    flow = _flow()
    assert flow.main(["--init-from", str(broken), "--tasks", "sst2", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: init_from:") and str(weights) in err[0], err
    assert "truncated" in err[0] and not started


# --------------------------------------------------------------------------------------------
# Ray Tune


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_over_two_tasks_reports_winners_predictions_and_the_failed_trial(ray_cluster, tiny_checkpoint,
                                                                                 samples, tmp_path, capsys):
    """4 trials (2 tasks x 2 learning rates), 2 epochs each; the MRPC trial at lr 3e-4 raises on
    every attempt (1 retry), and must be listed as FAILED while the other three succeed."""
    out = tmp_path / "out"
    code = _flow().main([
        "--init-from", str(tiny_checkpoint), "--label", "tiny", "--tasks", "sst2,mrpc", "--data", str(samples),
        "--lr", "1e-3", "3e-4", "--batch-size", "16", "--epochs", "2", "--max-train-examples", "64",
        "--max-eval-examples", "48", "--max-seq-len", "32", "--output", str(out), "--fail-trials", "mrpc@3e-4",
        "--max-failures", "1", "--json", str(tmp_path / "summary.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| checkpoint | SST-2 | MRPC | Average |" in printed and "| tiny |" in printed
    # the console: a line per trial start and end, the ends counted
    ends = [line for line in printed.splitlines() if line.startswith(("finished ", "FAILED "))]
    assert sorted(line.split()[0] for line in ends) == ["FAILED", "finished", "finished", "finished"], printed
    assert ends[-1].endswith("[4/4 trials done]") and "mrpc (tiny) lr 0.0003" in next(e for e in ends if "FAILED" in e)
    assert sum(line.startswith("started ") for line in printed.splitlines()) >= 4
    rows = list(csv.DictReader(io.StringIO((out / "latest" / "results.csv").read_text())))
    assert len(rows) == 4
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append((r["task"], float(r["learning_rate"])))
    assert by_status == {"OK": [("sst2", 3e-4), ("sst2", 1e-3), ("mrpc", 1e-3)], "FAILED": [("mrpc", 3e-4)]}
    failed = next(r for r in rows if r["status"] == "FAILED")
    assert "InjectedFault" in failed["error"] and "injected failure for mrpc" in failed["error"]
    for r in rows:
        if r["status"] == "OK":                                   # every epoch reported; the last is the result
            assert r["epoch"] == "2" and float(r["score"]) == float(r[f"dev_{'accuracy' if r['task'] == 'sst2' else 'f1'}"])
    results = json.loads((out / "latest" / "results.json").read_text())
    best = {b["task"]: b for b in results["best"]}
    assert set(best) == {"sst2", "mrpc"} and best["mrpc"]["config"]["learning_rate"] == 1e-3
    sst2 = [r for r in rows if r["task"] == "sst2"]
    assert best["sst2"]["score"] == max(float(r["score"]) for r in sst2)
    assert failed["failures"] == "2" and all(r["failures"] == "0" for r in rows if r["status"] == "OK")
    md = (out / "latest" / "results.md").read_text()
    assert "| tiny | mrpc |" in md[md.index("Failed and retried trials"):]
    assert "| FAILED | 2 | bertray.tune.trainer.InjectedFault: injected failure for mrpc" in md
    assert "| tiny | sst2 | " in md[md.index("Winning grid points"):]
    # the winners' prediction files were copied out of their Tune checkpoints
    assert (out / "latest" / "predictions" / "sst2" / "dev_predictions.tsv").is_file()
    assert len((out / "latest" / "predictions" / "sst2" / "SST-2.tsv").read_text().splitlines()) == 49
    assert (out / "latest" / "predictions" / "mrpc" / "MRPC.tsv").is_file()
    # did it learn anything: the trivial baseline's row, constant winners flagged, the winners'
    # confusion matrices (csv and png beside their predictions) and per-class scores
    glue = md.splitlines()[md.splitlines().index("| checkpoint | SST-2 | MRPC | Average |") + 2:][:2]
    baseline = {t: float(next(r for r in rows if r["task"] == t and r["status"] == "OK")[f"dev_baseline_{m}"])
                for t, m in (("sst2", "accuracy"), ("mrpc", "f1"))}
    assert glue[1].startswith(f"| trivial baseline | {baseline['sst2']:.1f} | {baseline['mrpc']:.1f} |"), glue
    for i, task in enumerate(("sst2", "mrpc")):
        constant = best[task]["metrics"]["dev_distinct_predictions"] == 1
        assert glue[0].split(" | ")[1 + i].endswith("(constant)") == constant, glue
        folder = out / "latest" / "predictions" / task
        counts = [list(map(int, r[1:])) for r in csv.reader(io.StringIO((folder / "confusion.csv").read_text()))][1:]
        assert sum(map(sum, counts)) == 48 and sum(1 for column in zip(*counts) if sum(column)) \
            == best[task]["metrics"]["dev_distinct_predictions"]
        assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"tiny / {task}, dev (48 items):" in md
    # Tune retried the failing trial (max_failures=1) before giving up: two recorded failures
    (error_file,) = [p for p in (out / "latest" / "tune").rglob("error.txt")]
    assert error_file.read_text().count("InjectedFault") >= 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["failed"] == 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_asha_compares_trials_of_one_task_only_with_results_in_object_storage(ray_cluster, tiny_checkpoint, samples,
                                                                              s3_bucket, tmp_path, caplog):
    """ASHA (reduction factor 2, grace period 1) schedules on the per-epoch `score` within each
    (row, task) only: the tiny model's STS-B Spearman (negative) never meets SST-2's accuracy (about
    56), yet the worse STS-B trial (lr 1e-2, about -49 after epoch 1 against -23 at lr 1e-4) is
    stopped at epoch 1. One ASHA over both tasks stopped both STS-B trials. Tune's trial
    directories, the results files and the winners' predictions all go to s3:// (the loopback S3 server)."""
    import logging

    import s3fs

    caplog.set_level(logging.INFO, logger="bertray.tune")
    output = f"s3://{s3_bucket}/finetune"
    cfg = FinetuneConfig(init_from=(str(tiny_checkpoint),), tasks="sst2,stsb", data=str(samples),
                         learning_rates=(1e-4, 1e-2), batch_sizes=(16,), epochs=(2,), max_train_examples=32,
                         max_eval_examples=32, max_seq_len=16, scheduler="asha", max_concurrent_trials=1,
                         output=output, cache_dir=str(tmp_path / "cache"))
    sweep = ft.run_sweep(cfg, verbose=0)
    assert len(sweep.records) == 4
    assert {r.status for r in sweep.records} <= {"OK", "STOPPED"}
    for r in sweep.records:
        assert (r.status == "STOPPED") == (r.metrics["epoch"] < 2) and r.metrics["epoch"] >= 1
    row = sweep.records[0].row
    status = {(r.task, r.config["learning_rate"]): r.status for r in sweep.records}
    assert status[("sst2", 1e-4)] == status[("stsb", 1e-4)] == "OK"     # each task keeps a trial to the end
    assert status[("stsb", 1e-2)] == "STOPPED"                          # and ASHA still stops within a task
    assert [m for m in caplog.messages if m.startswith("asha group")] == [
        f"asha group 1/2: {row} / sst2, 2 trials", f"asha group 2/2: {row} / stsb, 2 trials"]
    assert set(sweep.best) == {(row, "sst2"), (row, "stsb")}
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    folder = f"{s3_bucket}/finetune/" + fs.cat_file(f"{s3_bucket}/finetune/latest").decode().strip()   # the sweep's own
    assert plan.latest_sweep(f"s3://{s3_bucket}/finetune") == f"s3://{folder}"
    assert "| checkpoint | SST-2 | STS-B | Average |" in fs.cat_file(f"{folder}/results.md").decode()
    for task, submission in (("sst2", "SST-2.tsv"), ("stsb", "STS-B.tsv")):
        assert fs.isfile(f"{folder}/predictions/{task}/dev_predictions.tsv")
        assert fs.isfile(f"{folder}/predictions/{task}/{submission}")
    # one Tune experiment per group, inside the sweep's folder
    assert sweep.experiment == f"s3://{folder}/tune" and fs.isdir(sweep.experiment)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(sweep.experiment) if fs.isdir(p)) == [
        f"1-{ft.tables.slug(row)}-sst2", f"2-{ft.tables.slug(row)}-stsb"]
