"""Results tables: winner selection, the paper's layout, csv and json of every trial."""

from __future__ import annotations

import csv
import io
import json

from bertray.tune import results
from bertray.tune.results import FAILED, OK, STOPPED, TrialRecord


def _record(row, task, lr, score, status=OK, seed=0, **metrics):
    return TrialRecord(row=row, task=task, trial_id=f"{task}-{lr}-{seed}", status=status,
                       config={"learning_rate": lr, "batch_size": 32, "epochs": 3, "seed": seed},
                       metrics={"score": score, "epoch": 3, "train_loss": 0.3, **metrics} if score is not None else {},
                       error="Traceback ...\nInjectedFault: injected failure | for mrpc" if status == FAILED else None)


def _records():
    return [
        _record("bert", "mnli", 5e-5, 84.0, dev_matched_accuracy=84.0, dev_mismatched_accuracy=83.0),
        _record("bert", "mnli", 3e-5, 84.6, dev_matched_accuracy=84.6, dev_mismatched_accuracy=83.4),
        _record("bert", "sst2", 5e-5, 93.5, dev_accuracy=93.5),
        _record("bert", "sst2", 3e-5, 99.0, status=FAILED, dev_accuracy=99.0),    # failed: never the winner
        _record("bert", "mrpc", 5e-5, 88.9, dev_f1=88.9, dev_accuracy=84.0),
        _record("bert", "mrpc", 3e-5, None, status=FAILED),
        _record("bert", "wnli", 5e-5, 56.3, dev_accuracy=56.3),
        _record("bert", "squad1", 5e-5, 88.5, dev_f1=88.5, dev_exact_match=80.8),
        _record("bert", "conll2003", 5e-5, 95.0, seed=1, dev_f1=95.0, test_f1=91.5),
        _record("random init", "sst2", 5e-5, 80.0, dev_accuracy=80.0),
        _record("random init", "sst2", 3e-5, 81.0, status=STOPPED, dev_accuracy=81.0),
    ]


def test_best_per_row_and_task_ignores_failed_trials():
    best = results.select_best(_records())
    assert best[("bert", "mnli")].config["learning_rate"] == 3e-5
    assert best[("bert", "sst2")].score == 93.5
    assert best[("random init", "sst2")].score == 81.0          # a stopped (ASHA) trial competes
    assert ("bert", "mrpc") in best and best[("bert", "mrpc")].config["learning_rate"] == 5e-5


def test_markdown_has_the_paper_layout_winners_and_failures():
    text = results.markdown(_records())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| checkpoint | MNLI"))
    assert header == "| checkpoint | MNLI-(m/mm) | SST-2 | MRPC | WNLI | Average |"
    row = next(line for line in lines if line.startswith("| bert | 84.6/83.4"))
    # average over the numbers shown, MNLI m and mm separately, WNLI left out: (84.6+83.4+93.5+88.9)/4
    assert row == "| bert | 84.6/83.4 | 93.5 | 88.9 | 56.3 | 87.6 |"
    assert "| random init | - | 81.0 | - | - | - |" in lines
    assert "| bert | 80.8/88.5 |" in lines                      # SQuAD EM/F1 (Table 2)
    assert "| checkpoint | CoNLL-2003 F1 dev/test |" in lines and "| bert | 95.0/91.5 |" in lines
    winners = text[text.index("Winning grid points"):]
    assert "| bert | mnli | 3e-05 | 32 | 3 | 0 | 2/0 | dev_matched accuracy 84.60, dev_mismatched accuracy 83.40 |" in winners
    assert "| bert | conll2003 | 5e-05 | 32 | 3 | 1 | 1/0 |" in winners
    failures = text[text.index("Failed and retried trials"):]
    assert failures.count("\n| bert |") == 2 and failures.count("| FAILED | 0 |") == 2
    assert "InjectedFault: injected failure \\| for mrpc" in failures   # last line of the error, escaped


def test_csv_and_json_list_every_trial_with_status_config_metrics_error(tmp_path):
    paths = results.write_results(_records(), str(tmp_path / "out"), setting={"tasks": "glue"})
    assert set(paths) == {"md", "csv", "json"}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert len(rows) == 11
    failed = [r for r in rows if r["status"] == FAILED]
    assert len(failed) == 2 and all(r["error"].startswith("InjectedFault") for r in failed)
    assert rows[0]["learning_rate"] == "5e-05" and rows[0]["dev_matched_accuracy"] == "84.0"
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["setting"] == {"tasks": "glue"} and len(data["trials"]) == 11
    assert {(b["row"], b["task"]) for b in data["best"]} == {
        ("bert", t) for t in ("mnli", "sst2", "mrpc", "wnli", "squad1", "conll2003")} | {("random init", "sst2")}


def test_seed_means_per_grid_point_leave_out_failed_trials():
    records = [_record("bert", "sst2", 5e-5, score, seed=seed, dev_accuracy=score)
               for seed, score in enumerate((80.0, 82.0, 84.0))]
    records += [_record("bert", "sst2", 5e-5, 99.0, seed=3, status=FAILED),
                _record("bert", "sst2", 3e-5, 70.0), _record("random init", "sst2", 5e-5, 75.0)]
    means = {(m["row"], m["learning_rate"]): m for m in results.seed_means(records)}
    assert means[("bert", 5e-5)] == {"row": "bert", "task": "sst2", "learning_rate": 5e-5, "batch_size": 32,
                                     "epochs": 3, "seeds": 3, "mean": 82.0, "sd": 2.0, "min": 80.0, "max": 84.0}
    assert means[("bert", 3e-5)]["seeds"] == 1 and means[("random init", 5e-5)]["mean"] == 75.0
    text = results.markdown(records)
    assert "| bert | sst2 | 5e-05 | 32 | 3 | 3 | 82.00 | 2.00 | 80.00 | 84.00 |" in text
    assert "Mean over seeds" not in results.markdown(_records())      # one seed per grid point: no table
