"""bertray.train.curves and flows/plot_run.py: histories shaped like the pretraining worker writes them
(eval only every few intervals, no NSP keys in the MLM-only ablation) become one readable PNG."""

import importlib.util
import io
import json
import logging
import math
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from bertray.train import curves
from bertray.train.curves import RunCurves, load_run, plot_runs, write_run_curves

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINES = {"eval_mlm_baseline": 0.054, "eval_nsp_majority": 0.638}


def history(nsp: bool = True, intervals: int = 10, eval_every: int = 3) -> list[dict]:
    """What the worker appends every log interval (40 steps, 10k-step-style warmup scaled down)."""
    out = []
    for i in range(1, intervals + 1):
        step = 40 * i
        mlm = 1.9 + 7.3 * math.exp(-step / 250)
        entry = {"step": step, "phase": 0, "loss": mlm + (0.69 - 0.004 * i if nsp else 0.0), "mlm_loss": mlm,
                 "mlm_accuracy": 0.03 + 0.25 * (1 - math.exp(-step / 200)), "grad_norm": 2.5 / i ** 0.5,
                 "learning_rate": 1e-4 * min(1.0, step / 120) * (1 - step / (40 * intervals + 40)),
                 "sequences_per_s": 108.0 + 3 * (i % 2), "tokens_per_s": 13_300.0 + 350 * (i % 2),
                 "data_wait_share": 0.002 + 0.001 * (i % 3)}
        if nsp:
            entry.update(nsp_loss=0.69 - 0.004 * i, nsp_accuracy=0.52 + 0.01 * i)
        if i % eval_every == 0:
            entry.update(eval_loss=entry["loss"] + 0.3, eval_mlm_loss=mlm + 0.3,
                         eval_mlm_accuracy=entry["mlm_accuracy"] - 0.02)
            if nsp:
                entry.update(eval_nsp_loss=0.7, eval_nsp_accuracy=0.55 + 0.005 * i)
        out.append(entry)
    return out


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_MAGIC
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    return pixels


def colour_share(pixels: np.ndarray, colour: str) -> float:
    return float((np.abs(pixels[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < 0.03).mean())


def test_one_run_draws_every_series_and_its_baselines():
    buffer = io.BytesIO()
    plot_runs([RunCurves("base", history(), BASELINES)], buffer)
    pixels = png_pixels(buffer.getvalue())
    assert colour_share(pixels, "C0") > 0.005          # the curves were really drawn (a blank one: 0)
    assert pixels[..., :3].std() > 0.05

    fig = curves._figure([RunCurves("base", history(), BASELINES)])
    loss, mlm, nsp, lr, speed, wait = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["loss", "MLM accuracy", "NSP accuracy", "learning rate",
                                                   "sequences / s", "data wait (% of time)"]
    assert [line.get_label() for line in loss.get_lines()] == ["train", "MLM (train)", "NSP (train)", "held-out"]
    held_out = mlm.get_lines()[1]
    assert list(held_out.get_xdata()) == [120, 240, 360]           # only the intervals that evaluated
    assert [line.get_label() for line in nsp.get_lines()][-1] == "majority class 0.638"
    assert list(nsp.get_lines()[-1].get_ydata()) == [0.638, 0.638]
    assert max(wait.get_lines()[0].get_ydata()) == pytest.approx(0.4)  # percent, not a share
    assert len(lr.get_lines()) == len(speed.get_lines()) == 1


def test_several_runs_share_axes_one_colour_each(tmp_path):
    runs = [RunCurves("nsp", history(), BASELINES),
            RunCurves("mlm-only", history(nsp=False), {"eval_mlm_baseline": 0.05})]
    out = tmp_path / "sub" / "ablation.png"
    plot_runs(runs, out)
    pixels = png_pixels(out.read_bytes())
    assert colour_share(pixels, "C0") > 0.001 and colour_share(pixels, "C1") > 0.001

    loss, mlm, nsp, lr, speed, wait = curves._figure(runs).axes
    # loss: total, MLM, NSP, held-out for the NSP run; no NSP line for the MLM-only run
    assert len(loss.get_lines()) == 4 + 3
    assert len(mlm.get_lines()) == 3 + 3                  # train, held-out, baseline per run
    assert [line.get_label() for line in nsp.get_lines()] == ["nsp train", "nsp held-out", "nsp majority class 0.638"]
    assert len(lr.get_lines()) == len(speed.get_lines()) == len(wait.get_lines()) == 2
    for ax in (loss, mlm, nsp):
        for line in ax.get_lines():
            run = line.get_label().split(" ")[0]
            assert to_rgb(line.get_color()) == to_rgb("C0" if run == "nsp" else "C1")


def test_held_out_files_and_documents_are_drawn_and_named_apart():
    both = [{**e, **{f"heldout_{k[5:]}": v + 0.1 for k, v in e.items() if k.startswith("eval_")}} for e in history()]
    baselines = {**BASELINES, "heldout_mlm_baseline": 0.06, "heldout_nsp_majority": 0.55}
    _, mlm, nsp, *_ = curves._figure([RunCurves("both", both, baselines)]).axes
    assert [line.get_label() for line in nsp.get_lines()] == [
        "train", "held-out files", "held-out files: majority class 0.638",
        "held-out documents", "held-out documents: majority class 0.550"]
    assert list(mlm.get_lines()[3].get_xdata()) == [120, 240, 360]


def test_missing_keys_and_odd_values_do_not_crash():
    sparse = [{"step": 10, "loss": 7.0}, {"step": 20}, {"phase": 1, "loss": 6.0}, "junk",
              {"step": 30, "loss": float("nan"), "mlm_accuracy": True}, {"step": 40, "loss": 5.5}]
    fig = curves._figure([RunCurves("sparse", sparse, {}), RunCurves("empty", [], {"eval_nsp_majority": "x"})])
    loss, mlm, nsp = fig.axes[:3]
    assert list(loss.get_lines()[0].get_xdata()) == [10, 40]
    assert not mlm.get_lines() and not nsp.get_lines()
    assert "no data" in [text.get_text() for text in mlm.texts]
    buffer = io.BytesIO()
    plot_runs([RunCurves("empty", [], {})], buffer)
    png_pixels(buffer.getvalue())
    with pytest.raises(ValueError, match="no runs"):
        plot_runs([], io.BytesIO())


def write_run(url: str, entries, baselines=None) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    with fs.open(path + "/history.json", "w") as f:
        f.write(entries if isinstance(entries, str) else json.dumps(entries) + "\n")
    if baselines is not None:
        with fs.open(path + "/eval_baselines.json", "w") as f:
            f.write(json.dumps(baselines))


def test_load_run_reads_local_directory(tmp_path):
    write_run(str(tmp_path / "runs" / "base"), history(), BASELINES)
    write_run(str(tmp_path / "runs" / "mlm-only"), history(nsp=False))
    run = load_run(str(tmp_path / "runs" / "base"))
    assert run == RunCurves("base", history(), BASELINES)
    other = load_run(str(tmp_path / "runs" / "mlm-only") + "/")
    assert other.label == "mlm-only" and other.baselines == {} and "nsp_loss" not in other.history[0]


@pytest.fixture
def memory_url():
    url = f"memory://curves-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_load_run_and_write_curves_on_object_storage(memory_url):
    run_url = memory_url + "/runs/bert-mini"
    write_run(run_url, history(), BASELINES)
    run = load_run(run_url)
    assert run.label == "bert-mini" and run.baselines == BASELINES and len(run.history) == 10
    assert write_run_curves(run_url, run.history, run.baselines) is True
    with fsspec.open(run_url + "/curves.png", "rb") as f:
        png_pixels(f.read())


def test_load_run_errors_name_the_file(tmp_path, memory_url):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_run(str(tmp_path / "nowhere"))
    (tmp_path / "fresh").mkdir()
    with pytest.raises(FileNotFoundError, match=r"fresh/history\.json"):
        load_run(str(tmp_path / "fresh"))
    write_run(memory_url + "/broken", '[{"step": 40, "loss": 7.1},')
    with pytest.raises(ValueError, match=r"broken/history\.json is not valid JSON: Expecting value") as err:
        load_run(memory_url + "/broken")
    assert memory_url.split("//")[1] in str(err.value)
    write_run(str(tmp_path / "object"), {"step": 40})
    with pytest.raises(ValueError, match=r"object/history\.json should be a JSON list"):
        load_run(str(tmp_path / "object"))
    write_run(str(tmp_path / "empty"), [])
    with pytest.raises(ValueError, match="no logged intervals"):
        load_run(str(tmp_path / "empty"))
    write_run(str(tmp_path / "bad-baselines"), history(), [0.05])
    with pytest.raises(ValueError, match=r"eval_baselines\.json should be a JSON object"):
        load_run(str(tmp_path / "bad-baselines"))


@pytest.fixture
def without_matplotlib(monkeypatch):
    """A process where `import matplotlib` fails, as in an environment that lacks it."""
    curves._matplotlib_available.cache_clear()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    yield
    curves._matplotlib_available.cache_clear()


def test_write_run_curves_without_matplotlib_warns_once(tmp_path, without_matplotlib, caplog):
    with caplog.at_level(logging.WARNING, logger="bertray.train"):
        results = [write_run_curves(str(tmp_path), history(), BASELINES) for _ in range(3)]
    assert results == [False, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install matplotlib" in warnings[0]
    assert not (tmp_path / "curves.png").exists()


def _flow():
    spec = importlib.util.spec_from_file_location("plot_run_flow", REPO / "flows" / "plot_run.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    return flow


def test_flow_writes_the_picture(tmp_path, capsys, monkeypatch):
    write_run(str(tmp_path / "base"), history(), BASELINES)
    write_run(str(tmp_path / "mlm-only"), history(nsp=False))
    assert _flow().main([str(tmp_path / "base")]) == 0
    assert png_pixels((tmp_path / "base" / "curves.png").read_bytes()).size
    assert f"wrote {tmp_path / 'base' / 'curves.png'}" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    assert _flow().main([str(tmp_path / "base"), str(tmp_path / "mlm-only")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert _flow().main([str(tmp_path / "base"), str(tmp_path / "mlm-only"), "--output", "out/both.png"]) == 0
    assert (tmp_path / "out" / "both.png").read_bytes()[:8] == PNG_MAGIC


def test_flow_errors_are_one_line_and_exit_2(tmp_path, capsys, without_matplotlib):
    assert _flow().main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing: no such run directory" in err
    write_run(str(tmp_path / "base"), history())
    assert _flow().main([str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
    assert not (tmp_path / "base" / "curves.png").exists()


def test_the_summary_says_in_words_whether_nsp_and_mlm_were_learned():
    spec = importlib.util.spec_from_file_location("pretrain_flow", REPO / "flows" / "pretrain.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    constant = {"eval_nsp_accuracy": 0.6562, "eval_nsp_majority": 0.6562, "eval_mlm_accuracy": 0.100,
                "eval_mlm_baseline": 0.061}
    assert flow.learning_lines(constant) == [
        "held-out NSP 65.6% (majority label 65.6%): not learned (needs 70.6%)",
        "held-out MLM 10.0% (most frequent token 6.1%, 1.6x): not learned (needs 2x)"]
    learned = {**constant, "eval_nsp_accuracy": 0.710, "eval_mlm_accuracy": 0.130}
    assert [line.rsplit(": ", 1)[1] for line in flow.learning_lines(learned)] == ["learned", "learned"]
    assert flow.learning_lines({"eval_mlm_accuracy": 0.13, "eval_mlm_baseline": 0.061})[0].endswith("learned")
    both = {**learned, "heldout_nsp_accuracy": 0.86, "heldout_nsp_majority": 0.54}
    assert flow.learning_lines(both) == [
        "held-out files NSP 71.0% (majority label 65.6%): learned",
        "held-out files MLM 13.0% (most frequent token 6.1%, 2.1x): learned",
        "held-out documents NSP 86.0% (majority label 54.0%): learned"]
