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


def _learned(row, task, score, distinct, **metrics):
    return _record(row, task, 5e-5, score, dev_distinct_predictions=distinct, **metrics)


def _with_baselines():
    nan = float("nan")
    return [
        _learned("bert", "sst2", 93.5, 2, dev_accuracy=93.5, dev_baseline_accuracy=50.9),
        _learned("bert", "cola", 0.0, 1, dev_mcc=0.0, dev_baseline_mcc=0.0),
        _learned("bert", "stsb", 88.0, 1489, dev_spearman=88.0, dev_pearson=88.4, dev_baseline_spearman=nan,
                 dev_baseline_pearson=nan),
        _learned("bert", "mrpc", 81.2, 1, dev_f1=81.2, dev_accuracy=68.4, dev_baseline_f1=81.2,
                 dev_baseline_accuracy=68.4),
        _learned("bert", "conll2003", 0.0, 1, dev_f1=0.0, test_f1=0.0, test_distinct_predictions=3,
                 dev_baseline_f1=0.0, test_baseline_f1=0.0),
        _learned("bert", "squad2", 50.1, 1, dev_f1=50.1, dev_exact_match=50.1, dev_baseline_f1=50.1,
                 dev_baseline_exact_match=50.1),
    ]


def test_results_give_each_task_its_trivial_baseline_and_flag_constant_winners():
    text = results.markdown(_with_baselines())
    lines = text.splitlines()
    glue = lines.index("| checkpoint | SST-2 | CoLA | STS-B | MRPC | Average |")
    assert lines[glue + 2] == "| bert | 93.5 | 0.0 (constant) | 88.0 | 81.2 (constant) | 65.7 |"
    # STS-B's correlations are undefined for a constant: n/a, and so no average
    assert lines[glue + 3] == "| trivial baseline | 50.9 | 0.0 | n/a | 81.2 | - |"
    assert ("Trivial baseline: what a predictor that learned nothing scores on the same dev examples with the task's "
            "own scorer; SST-2, CoLA, MRPC: majority class of train; STS-B: mean of train (correlations undefined: "
            "n/a).") in lines
    assert any(line.startswith("(constant): the winner predicted one and the same thing") for line in lines)
    # a cell over several dev splits is flagged when one of them is constant; SQuAD 2.0's empty answer
    assert "| bert | 0.0/0.0 (constant) |" in lines and "| trivial baseline | 0.0/0.0 |" in lines
    assert "| bert | 50.1/50.1 (constant) |" in lines and "| trivial baseline | 50.1/50.1 |" in lines
    assert "SQuAD2.0 EM/F1: empty answer everywhere." in text and "no entity (every word O)" in text
    winners = text[text.index("Winning grid points"):]
    assert ("| bert | mrpc | 5e-05 | 32 | 3 | 0 | 1/0 | dev f1 81.20, dev accuracy 68.40 | dev f1 81.20, "
            "dev accuracy 68.40 | **dev 1: constant** |") in winners
    assert "| dev accuracy 93.50 | dev accuracy 50.90 | dev 2 |" in winners
    assert "| dev spearman n/a, dev pearson n/a | dev 1489 |" in winners
    assert "| **dev 1: constant**, test 3 |" in winners


def test_a_learning_winner_is_not_flagged_and_old_records_show_no_baseline():
    text = results.markdown([_learned("bert", "sst2", 93.5, 2, dev_accuracy=93.5, dev_baseline_accuracy=50.9)])
    assert "| bert | 93.5 |" in text and "(constant)" not in text and "| trivial baseline | 50.9 |" in text
    old = results.markdown(_records())
    assert "| trivial baseline |" not in old and "(constant)" not in old and "Trivial baseline:" not in old


def test_per_class_tables_of_the_winners_and_tasks_outside_the_paper_tables(tmp_path):
    import dataclasses

    import numpy as np

    from bertray.tasks import confusion
    from bertray.tasks.registry import TASKS

    tickets = dataclasses.replace(TASKS["sst2"], name="tickets", column="Tickets", labels=("billing", "bug", "other"))
    records = [_learned("bert", "tickets", 60.0, 3, dev_accuracy=60.0, dev_baseline_accuracy=40.0)]
    matrix = confusion.Confusion(tickets.labels, np.array([[3, 1, 0], [1, 2, 1], [0, 1, 1]]))
    specs = {**TASKS, "tickets": tickets}
    paths = results.write_results(records, str(tmp_path), confusions={("bert", "tickets"): {"dev": matrix}},
                                  specs=specs)
    text = (tmp_path / "results.md").read_text()
    assert "### Other tasks, dev" in text and "| checkpoint | Tickets |" in text
    assert "| bert | 60.0 |" in text and "| trivial baseline | 40.0 |" in text
    assert "bert / tickets, dev (10 items):" in text
    assert "| billing | 75.0 | 75.0 | 75.0 | 4 | 4 |" in text
    assert "| other | 50.0 | 50.0 | 50.0 | 2 | 2 |" in text
    best = json.loads((tmp_path / "results.json").read_text())["best"][0]
    assert best["confusion"]["dev"] == {"labels": list(tickets.labels), "counts": matrix.counts.tolist()}
    assert set(paths) == {"md", "csv", "json"}
