import dataclasses
import inspect
import os
import pathlib
import pickle
import re
from typing import Mapping

import pytest

from bertray.errors import ConfigError, TaskDataError
from bertray.tasks.registry import FAMILIES, GROUPS, TASKS, Family, TaskSpec, resolve_tasks

REPO = pathlib.Path(__file__).resolve().parents[2]

ALL = ["mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli",
       "squad1", "squad2", "swag", "conll2003", "conll2003_feature"]


def test_the_table_has_every_task_once_with_a_known_family():
    assert list(TASKS) == ALL
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name and spec.family in FAMILIES
        assert spec.metric == spec.metrics[0] and spec.dev_splits and set(spec.dev_splits) <= set(spec.files)
        assert set(spec.test_splits) <= set(spec.files)
        assert spec.grid.combinations()


def test_primary_metrics_and_columns_follow_the_paper():
    primary = {name: spec.metric for name, spec in TASKS.items()}
    assert primary == {"mnli": "accuracy", "qqp": "f1", "qnli": "accuracy", "sst2": "accuracy", "cola": "mcc",
                       "stsb": "spearman", "mrpc": "f1", "rte": "accuracy", "wnli": "accuracy", "squad1": "f1",
                       "squad2": "f1", "swag": "accuracy", "conll2003": "f1", "conll2003_feature": "f1"}
    assert TASKS["mnli"].column == "MNLI-(m/mm)" and TASKS["squad1"].column == "SQuAD1.1 EM/F1"
    assert TASKS["qqp"].metrics == ("f1", "accuracy") and TASKS["stsb"].metrics == ("spearman", "pearson")


def test_grids_and_lengths_follow_the_paper():
    glue = TASKS["rte"].grid
    assert glue.learning_rates == (5e-5, 4e-5, 3e-5, 2e-5) and glue.batch_sizes == (32,) and glue.epochs == (3,)
    assert len(glue.combinations()) == 4
    assert (TASKS["squad1"].grid.batch_sizes, TASKS["squad1"].grid.epochs) == ((32,), (3,))
    assert (TASKS["squad2"].grid.learning_rates, TASKS["squad2"].grid.batch_sizes, TASKS["squad2"].grid.epochs) \
        == ((5e-5,), (48,), (2,))
    assert (TASKS["swag"].grid.learning_rates, TASKS["swag"].grid.batch_sizes) == ((2e-5,), (16,))
    assert len(TASKS["conll2003"].grid.combinations()) == 3 * 2 * 3
    assert {s.max_seq_len for s in TASKS.values() if s.family == "span"} == {384}
    assert {s.max_seq_len for s in TASKS.values() if s.family != "span"} == {128}
    assert TASKS["squad2"].allow_no_answer and not TASKS["squad1"].allow_no_answer
    assert TASKS["conll2003_feature"].feature_based and not TASKS["conll2003"].feature_based


def test_head_widths():
    assert TASKS["mnli"].num_labels == 3 and TASKS["sst2"].num_labels == 2 and TASKS["stsb"].num_labels == 1
    assert TASKS["conll2003"].num_labels == 9 and TASKS["swag"].num_labels == 1


def test_resolve_tasks_groups_order_and_duplicates():
    assert [s.name for s in resolve_tasks("glue,squad1")] == [*GROUPS["glue"], "squad1"]
    assert GROUPS["glue"] == ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")
    assert [s.name for s in resolve_tasks(" SQuAD , rte,squad2 ")] == ["squad1", "squad2", "rte"]
    assert [s.name for s in resolve_tasks(["swag", "swag"])] == ["swag"]
    assert [s.name for s in resolve_tasks("all")] == ALL


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown task 'sst-2'; did you mean sst2") as info:
        resolve_tasks("glue,sst-2")
    assert "valid tasks: mnli, qqp" in str(info.value) and "groups: glue, squad, all" in str(info.value)
    with pytest.raises(ConfigError, match="no task given"):
        resolve_tasks(" , ")


def test_paths_follow_the_standard_layout_of_shared_data(shared_data):
    for name, split in [("sst2", "train"), ("cola", "dev"), ("mrpc", "test"), ("stsb", "dev"), ("wnli", "train"),
                        ("squad1", "dev"), ("conll2003", "dev"), ("conll2003", "test")]:
        assert os.path.isfile(TASKS[name].path(shared_data, split)), (name, split)
    assert TASKS["mnli"].path("s3://bucket/bench/", "dev_mismatched") \
        == "s3://bucket/bench/glue/MNLI/dev_mismatched.tsv"
    assert TASKS["swag"].path("/d", "dev") == "/d/swag/val.csv"
    assert TASKS["squad2"].path("/d", "dev") == "/d/squad/v2.0/dev-v2.0.json"
    with pytest.raises(ConfigError, match="no split 'dev'; choose one of train, dev_matched"):
        TASKS["mnli"].path("/d", "dev")


def test_missing_file_is_a_task_data_error_with_the_expected_layout(tmp_path):
    with pytest.raises(TaskDataError, match=r"no such file; qnli expects glue/QNLI/\{train.tsv,dev.tsv,test.tsv\}"):
        TASKS["qnli"].read(tmp_path, "dev")


def test_missing_model_output_names_what_is_needed(shared_data):
    examples, _ = TASKS["wnli"].read(shared_data, "dev")
    with pytest.raises(ValueError, match="needs model output 'logits'"):
        TASKS["wnli"].evaluate(examples, {}, {"start_logits": None})


def test_specs_survive_pickling_and_hash():
    # Ray Tune ships specs to trial workers.
    spec = pickle.loads(pickle.dumps(TASKS["squad2"]))
    assert spec == TASKS["squad2"] and hash(spec) == hash(TASKS["squad2"])


# --------------------------------------------------------------------------------------------
# Families: every difference between them lives in their entry


OPTIONAL = {"feature_based_head", "pad_value"}      # None has a meaning there: no such head, not per token


def test_every_family_defines_every_field():
    for name, family in FAMILIES.items():
        for f in dataclasses.fields(Family):
            value = getattr(family, f.name)
            assert value is not None or f.name in OPTIONAL, (name, f.name)
        for key in ("read", "featurize", "decode", "evaluate", "write_predictions", "config_overrides",
                    "export_config"):
            assert callable(getattr(family, key)), (name, key)
        for key in ("head", "auto_class", "pipeline_tag", "description"):
            assert isinstance(getattr(family, key), str) and getattr(family, key), (name, key)
        assert family.target_keys and all(isinstance(k, str) for k in family.target_keys), name
        assert family.output_keys and all(isinstance(k, str) for k in family.output_keys), name
        assert family.target_dtype in ("long", "float") and isinstance(family.targets_per_token, bool), name
        assert family.pad_value is None or isinstance(family.pad_value, float), name
        assert isinstance(family.train_options, Mapping), name
    for spec in TASKS.values():           # what the families compute from a spec
        assert isinstance(spec.family_info.config_overrides(spec), dict)
        assert isinstance(spec.family_info.export_config(spec), dict)
    assert FAMILIES["regression"].target_dtype == "float" and FAMILIES["span"].pad_value == -1e4
    assert FAMILIES["token"].targets_per_token and FAMILIES["span"].train_options == {"keep_offsets": False}


def test_head_names_resolve_to_heads_that_take_the_targets_and_give_the_outputs():
    torch = pytest.importorskip("torch")
    from bertray.model import heads

    for name, family in FAMILIES.items():
        for head in filter(None, (family.head, family.feature_based_head)):
            cls = getattr(heads, head, None)
            assert isinstance(cls, type) and issubclass(cls, torch.nn.Module), (name, head)
            forward = inspect.signature(cls.forward)
            assert set(family.target_keys) <= set(forward.parameters), (name, head)
            output = getattr(heads, forward.return_annotation)         # a dataclass, e.g. TaskOutput
            assert set(family.output_keys) <= {f.name for f in dataclasses.fields(output)}, (name, head)
        assert isinstance(getattr(torch, family.target_dtype), torch.dtype), name
    assert {n: s.family_info.head_name(s) for n, s in TASKS.items() if n in ("conll2003", "conll2003_feature")} \
        == {"conll2003": "BertForTokenClassification", "conll2003_feature": "BertFeatureBasedTagger"}
    with pytest.raises(ConfigError, match="no feature-based head"):
        FAMILIES["span"].head_name(dataclasses.replace(TASKS["squad1"], feature_based=True))


@pytest.mark.parametrize("path", ["bertray/tune/trainer.py", "bertray/tune/export.py", "bertray/tune/results.py",
                                  "bertray/tasks/confusion.py"])
def test_the_trainer_and_the_export_hold_no_family_switch(path):
    text = (REPO / path).read_text(encoding="utf-8")
    assert not re.findall(r"spec\.family\s*(?:==|!=|in\s*[(\[{])", text)
    assert not re.findall(r"(?<!FAMILIES)\[\s*spec\.family\s*\]", text)     # no dict keyed by family
    assert not [n for n in FAMILIES if re.search(rf"[\"']{n}[\"']", text)]   # nor a family's name
