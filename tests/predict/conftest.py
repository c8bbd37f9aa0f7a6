"""Fixtures of the prediction and service tests: fine-tuned-layout model folders made from the real MiniLM checkpoint."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def benchmark_module(name: str):
    """A script of benchmarks/ as a module (its model builders are shared with the tests)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sst2_model(tmp_path_factory, minilm_dir, shared_data) -> pathlib.Path:
    """MiniLM with an SST-2 classification head (fresh: outputs are compared with the model run
    directly, so accuracy does not matter), saved in the Hugging Face layout."""
    return benchmark_module("predict").build_sst2_model(tmp_path_factory.mktemp("sst2-model"), minilm_dir,
                                                         shared_data, steps=0)


@pytest.fixture(scope="session")
def qa_model(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """MiniLM with a (fresh) question-answering head, saved in the Hugging Face layout."""
    import torch

    from bertray import wordpiece
    from bertray.model.heads import BertForQuestionAnswering

    directory = tmp_path_factory.mktemp("qa-model")
    torch.manual_seed(0)
    BertForQuestionAnswering.from_pretrained(minilm_dir).save_pretrained(directory)
    wordpiece.save(wordpiece.load(minilm_dir), directory)
    return directory
