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


def build_ner_model(directory, minilm_dir, data_root, *, steps: int = 32, batch_size: int = 16,
                    learning_rate: float = 1e-4, max_seq_len: int = 64, seed: int = 0) -> pathlib.Path:
    """MiniLM's token-classification head fine-tuned for `steps` steps on CoNLL-2003 train
    sentences that hold an entity (the sweep's reader and featurizer: tags on first sub-tokens),
    saved by the sweep's own export (`bertray.tune.export.save_model`), so the folder is exactly
    what a sweep keeps. The embeddings and the lower half of the layers stay frozen and the
    classifier learns at 20x the other layers' rate: a few dozen steps then tag entities (well
    enough to give the grouping real B-/I- runs, several types and low scores), not only O."""
    import torch

    from bertray.tasks.registry import TASKS

    spec = TASKS["conll2003"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # measured: 11 s on one thread, minutes on two beside other busy processes
    try:
        return _fine_tune_ner(directory, minilm_dir, data_root, spec, steps=steps, batch_size=batch_size,
                              learning_rate=learning_rate, max_seq_len=max_seq_len, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _fine_tune_ner(directory, minilm_dir, data_root, spec, *, steps, batch_size, learning_rate, max_seq_len, seed):
    import numpy as np
    import torch

    from bertray import wordpiece
    from bertray.model.heads import BertForTokenClassification
    from bertray.tasks import ner
    from bertray.tune.export import save_model

    torch.manual_seed(seed)
    model = BertForTokenClassification.from_pretrained(minilm_dir, id2label=dict(enumerate(spec.labels)))
    model.bert.embeddings.requires_grad_(False)         # the lower half frozen: a third of the work,
    model.bert.encoder.layer[:3].requires_grad_(False)  # and the top layers still learn
    tokenizer = wordpiece.load(minilm_dir)
    examples, _ = ner.read_conll(pathlib.Path(data_root) / spec.data_dir / spec.files["train"], spec.labels)
    examples = [e for e in examples[:3 * steps * batch_size] if any(t != "O" for t in e.tags)][:steps * batch_size]
    features = ner.featurize_ner(examples, tokenizer, max_seq_len, spec.labels)
    encoder = [p for p in model.bert.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": encoder, "lr": learning_rate},
                                   {"params": model.classifier.parameters(), "lr": 20 * learning_rate}],
                                  weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.train()
    for step in range(steps):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        mask = torch.from_numpy(features["attention_mask"][rows]).long()
        length = int(mask.sum(1).max())
        batch = {k: torch.from_numpy(np.ascontiguousarray(features[k][rows][:, :length])).long()
                 for k in ("input_ids", "token_type_ids", "labels")}
        model(batch["input_ids"], batch["token_type_ids"], mask[:, :length], labels=batch["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return save_model(model, tokenizer, spec, directory, max_seq_len=spec.max_seq_len)


@pytest.fixture(scope="session")
def ner_model(tmp_path_factory, minilm_dir, shared_data) -> pathlib.Path:
    """MiniLM briefly fine-tuned on CoNLL-2003 NER, saved as the sweep saves it."""
    return build_ner_model(tmp_path_factory.mktemp("ner-model"), minilm_dir, shared_data)


MULTILABEL_LABELS = ("sports", "politics", "business", "science")


@pytest.fixture(scope="session")
def multilabel_model(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """MiniLM with a (fresh) 4-label multilabel head, saved in the Hugging Face layout with the
    config keys a multilabel sweep writes: problem_type multi_label_classification, id2label,
    label2id and threshold. Fresh sigmoid scores sit near 0.5, so a 0.5 threshold splits the
    labels of most texts: both sides of the threshold are exercised."""
    import json

    import torch

    from bertray import wordpiece
    from bertray.model.heads import BertForSequenceClassification

    directory = tmp_path_factory.mktemp("multilabel-model")
    torch.manual_seed(1)
    BertForSequenceClassification.from_pretrained(minilm_dir, id2label=dict(enumerate(MULTILABEL_LABELS))) \
        .save_pretrained(directory)
    wordpiece.save(wordpiece.load(minilm_dir), directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(problem_type="multi_label_classification", threshold=0.5,
                  id2label={str(i): label for i, label in enumerate(MULTILABEL_LABELS)},
                  label2id={label: i for i, label in enumerate(MULTILABEL_LABELS)})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
