"""A fine-tuned task model as a Hugging Face model folder: weights, config, tokenizer, model card.

The folder is what `transformers.AutoModelFor<head>.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load, and what bertray's heads load back:

    config.json             the encoder's keys, `architectures` = the head's class (the same name in
                            both libraries), `id2label`/`label2id`/`num_labels` from the task's labels,
                            `problem_type` (regression for STS-B), `finetuning_task`, and a `bertray`
                            entry (task, family, max_seq_len) that transformers keeps and ignores
    model.safetensors       every tensor of the head and its encoder, Hugging Face names
    vocab.txt, tokenizer.json, tokenizer_config.json
                            the checkpoint's WordPiece tokenizer (`do_lower_case` as its vocabulary
                            was built; `model_max_length` the model's positions, so that
                            `truncation=True` works in transformers)
    README.md               the model card: task, dev metrics, grid point, seed, source checkpoint, data

The feature-based CoNLL-2003 tagger (frozen encoder, last layers -> BiLSTM -> tags) has no
transformers class: its folder holds the BiLSTM and classifier beside the frozen encoder's
tensors, `architectures` names bertray's class and the card says to load it with bertray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from bertray.model import hf_format
from bertray.storage import redact_url
from bertray.tasks.registry import TaskSpec

CARD_NAME = "README.md"


def loadable_by_transformers(spec: TaskSpec) -> bool:
    """Whether a transformers Auto class builds this task's head (all but the feature-based tagger)."""
    return not spec.feature_based


def config_keys(spec: TaskSpec, num_labels: int, max_seq_len: int) -> dict[str, Any]:
    """The config.json keys that say what the head predicts, beyond the encoder's architecture;
    the family adds its own (`problem_type`, the label maps)."""
    keys: dict[str, Any] = {"finetuning_task": spec.name, "num_labels": num_labels,
                            "bertray": {"task": spec.name, "family": spec.family, "max_seq_len": max_seq_len,
                                        "transformers_loadable": loadable_by_transformers(spec)}}
    keys.update(spec.family_info.export_config(spec))
    return keys


def save_model(model: torch.nn.Module, tokenizer, spec: TaskSpec, directory: str | os.PathLike, *,
               max_seq_len: int) -> Path:
    """Write `model` (a bertray head) and `tokenizer` as a Hugging Face model folder (no card)."""
    from bertray import wordpiece

    folder = Path(directory)
    config = model.config
    hf_format.save_state_dict(folder, config, model.state_dict(), architectures=[type(model).__name__],
                              extra_config=config_keys(spec, config.num_labels, max_seq_len))
    wordpiece.save(tokenizer, folder)
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    settings["model_max_length"] = config.max_position_embeddings
    settings_file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------
# Model card


def dev_metrics(spec: TaskSpec, metrics: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(split, metric, value) of every metric the task reports on its labelled splits, as scored."""
    out = []
    for split in spec.dev_splits:
        for name in spec.metrics:
            value = metrics.get(f"{split}_{name}")
            if isinstance(value, (int, float)):
                out.append((split, name, float(value)))
    return out


def _data(spec: TaskSpec, trial: Mapping[str, Any]) -> str:
    """Where the task's data came from: the data root, or your own task's files."""
    if spec.source is None:
        return redact_url(str(trial.get("data", "?")))
    held_out = " (dev: 10% held out of train)" if spec.source.holdout else ""
    return ", ".join(f"{split} {redact_url(url)}" for split, url in spec.files.items()
                     if not (held_out and split == "dev")) + held_out


def model_card(spec: TaskSpec, trial: Mapping[str, Any], metrics: Mapping[str, Any], *, row: str | None = None,
               trial_id: str | None = None, selection: str | None = None) -> str:
    """The folder's README.md. `trial`: the trial's settings (`TrialConfig` as a mapping);
    `metrics`: its last report; `row`, `trial_id`, `selection`: how the sweep chose it, when known."""
    source = redact_url(str(trial.get("init_from", "?")))
    if trial.get("random_init"):
        source = f"random weights in the architecture of {source}"
    if row:
        source = f"{row} ({source})"
    limits = [f"max_seq_len {trial.get('max_seq_len') or spec.max_seq_len}"]
    for key, what in (("max_train_examples", "training"), ("max_eval_examples", "dev")):
        if trial.get(key):
            limits.append(f"first {trial[key]:,} {what} examples")
    scores = dev_metrics(spec, metrics)
    family = spec.family_info.description
    if spec.feature_based:
        family += ", feature-based: frozen encoder, BiLSTM head"
    primary = f"{spec.dev_splits[0]} {spec.metric}"
    lines = ["---", f"library_name: {'transformers' if loadable_by_transformers(spec) else 'bertray'}",
             f"pipeline_tag: {spec.family_info.pipeline_tag}", "tags:", "- bert", "- bertray", f"- {spec.name}", "---",
             "", f"# {spec.name}: {spec.column}" if spec.column != spec.name else f"# {spec.name}", "",
             f"BERT fine-tuned on {spec.name} ({family}) by bertray's fine-tuning sweep (flows/finetune.py).", "",
             "| | |", "|---|---|",
             f"| task | {spec.name} ({family}"
             + (f"; labels {', '.join(spec.labels)}" if spec.labels else "") + ") |",
             f"| dev metrics | {', '.join(f'{s} {n} {v:.2f}' for s, n, v in scores) or 'none reported'} |",
             f"| selected on | {primary}" + (f"; {selection}" if selection else "") + " |",
             f"| grid point | learning rate {trial.get('learning_rate'):g}, batch size "
             f"{trial.get('batch_size')}, epochs {trial.get('epochs')} |",
             f"| seed | {trial.get('seed')} |",
             f"| source checkpoint | {source} |",
             f"| data | {_data(spec, trial)} ({', '.join(limits)}) |"]
    if trial_id:
        lines.append(f"| trial | {trial_id} |")
    lines += ["", "## Use", ""]
    if loadable_by_transformers(spec):
        auto = spec.family_info.auto_class
        lines += ["```python", f"from transformers import AutoTokenizer, {auto}", "",
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
                  f'model = {auto}.from_pretrained("path/to/this/folder").eval()', "```"]
    else:
        lines += ["bertray only: this is the paper's feature-based approach (section 5.3): the frozen encoder's "
                  "last layers feed a BiLSTM and a tag classifier, stored beside the encoder's tensors. No "
                  "transformers class has that head, so its Auto classes cannot load this folder (they would "
                  "build a plain token classifier without the BiLSTM).", "",
                  "```python", "from bertray.model.heads import BertFeatureBasedTagger", "",
                  'model = BertFeatureBasedTagger.from_pretrained("path/to/this/folder").eval()', "```"]
    return "\n".join(lines) + "\n"


def write_card(directory: str | os.PathLike, text: str) -> None:
    Path(directory, CARD_NAME).write_text(text, encoding="utf-8")


__all__ = ["CARD_NAME", "config_keys", "dev_metrics", "loadable_by_transformers", "model_card", "save_model",
           "write_card"]
