"""Fixtures of the fine-tuning tests: small checkpoints made on the spot, data roots in the official layouts."""

from __future__ import annotations

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"


def make_checkpoint(directory: pathlib.Path, minilm_dir: pathlib.Path, *, is_causal: bool = False,
                    seed: int = 0) -> pathlib.Path:
    """A tiny random `BertForPreTraining` (2 layers, 32 wide) with the bert-base-uncased vocabulary,
    saved as a checkpoint directory in the Hugging Face layout (what a pretraining run writes)."""
    import torch

    from bertray import wordpiece
    from bertray.model.config import BertConfig
    from bertray.model.heads import BertForPreTraining

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, is_causal=is_causal)
    BertForPreTraining(config).save_pretrained(directory)
    wordpiece.save(wordpiece.load(minilm_dir), directory)
    return directory


@pytest.fixture(scope="session")
def checkpoint_factory(minilm_dir):
    """`make(directory, is_causal=False, seed=0)`: a tiny checkpoint in `directory`."""
    return lambda directory, **kw: make_checkpoint(pathlib.Path(directory), minilm_dir, **kw)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), minilm_dir)


@pytest.fixture(scope="session")
def samples() -> pathlib.Path:
    """The GLUE samples shipped with the repository (samples/glue/...)."""
    return SAMPLES


@pytest.fixture(scope="session")
def families_root(tmp_path_factory, shared_data) -> pathlib.Path:
    """A data root with a few examples of every non-GLUE family in its official layout, built from
    ../shared/data in a temporary folder (CoNLL-2003 never leaves ../shared/data otherwise)."""
    root = tmp_path_factory.mktemp("families")
    # SQuAD v1.1 and v2.0: two articles of each dev file, one as train and one as dev
    for version, source in (("v1.1", "squad/v1.1/dev-v1.1.json"), ("v2.0", "squad/v2.0-sample/dev-v2.0.Normans_Rhine.json")):
        data = json.loads((shared_data / source).read_text())
        (root / "squad" / version).mkdir(parents=True)
        for split, article in (("train", 0), ("dev", 1)):
            part = data["data"][article]
            part = {**part, "paragraphs": part["paragraphs"][:2]}
            path = root / "squad" / version / f"{split}-{version}.json"
            path.write_text(json.dumps({"version": data.get("version", version), "data": [part]}))
    # SWAG: the official CSV layout, rows from the 10-example sample
    import csv

    rows = [json.loads(line) for line in (shared_data / "swag-sample" / "sample.json").read_text().splitlines()
            if line.strip()]
    (root / "swag").mkdir()
    columns = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
               "ending0", "ending1", "ending2", "ending3", "label"]
    for split, part in (("train.csv", rows[:6]), ("val.csv", rows[6:])):
        with open(root / "swag" / split, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for i, row in enumerate(part):
                writer.writerow({"": i, "video-id": f"v{i}", "fold-ind": i, "gold-source": "gold",
                                 "startphrase": f"{row['sent1']} {row['sent2']}", **row})
    # CoNLL-2003: the first sentences of train and valid, in place of the full files
    (root / "conll2003").mkdir()
    for name, sentences in (("train.txt", 40), ("valid.txt", 20), ("test.txt", 20)):
        blocks = (shared_data / "conll2003" / name).read_text().split("\n\n")[:sentences]
        (root / "conll2003" / name).write_text("\n\n".join(blocks) + "\n")
    return root
