"""Your own task's files -> the example types of the paper's task families.

A task card (`bertray.tasks.card`) names fields; this module reads a file's rows
(`bertray.tasks.files`) and makes from each the example its family's featurizer already takes:
`GlueExample` (classification, regression), `MultiLabelExample`, `NerExample` (token),
`SquadExample` (span), `SwagExample` (multiple choice). A row that cannot become one (an empty
text, a missing or unparsable label, a wrong number of fields, an answer that is not in its
context) is not an error here: it comes out with its problem, and the callers count it (the
driver's checks name the first ones, `file:line`; a trial skips it).

Without a dev file, dev is a seeded 10% of train (`held_out`): within every run of ten rows of
one class, one row, chosen by a hash of (seed, class, run), goes to dev. That is a stratified
split made while streaming, the same on the driver and in every trial, whatever the file's size.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from typing import Any, Iterator, Mapping, Sequence

from bertray.tasks import files, metrics, ner, squad
from bertray.tasks.glue import GlueExample
from bertray.tasks.multilabel import MultiLabelExample
from bertray.tasks.swag import SwagExample

HOLDOUT_RUN = 10                          # one row of every ten of a class goes to dev: 10%
_INTEGER = re.compile(r"[-+]?\d+")


class BadRow(ValueError):
    """Why one row cannot become an example (counted and named by the caller, never raised out)."""


# --------------------------------------------------------------------------------------------
# Field values


def field(fields: Mapping[str, Any], name: str) -> Any:
    if name not in fields:
        raise BadRow(f"no field {name!r}")
    return fields[name]


def text_value(fields: Mapping[str, Any], name: str) -> str:
    value = field(fields, name)
    text = "" if value is None else value if isinstance(value, str) else str(value)
    if not text.strip():
        raise BadRow(f"empty text in {name!r}")
    return text


def class_label(value: Any) -> str | None:
    """A class label as text: 3 and 3.0 and "3" are "3", True is "true"; None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    return text or None


def float_label(value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRow("missing label")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRow(f"label {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadRow(f"label {value!r} is not a finite number")
    return number


def listish(value: Any, delimiter: str = ",") -> list | None:
    """A list from a list, a JSON or Python list literal ("[a, b]", as pandas writes lists into
    CSV), or a `delimiter`-separated string; None when missing."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):                       # numpy arrays from Parquet
        return list(value.tolist())
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, (list, tuple)):
                return list(parsed)
    if not text:
        return []
    return [part.strip() for part in text.split(delimiter) if part.strip()]


def label_list(value: Any, delimiter: str) -> tuple[str, ...]:
    items = listish(value, delimiter)
    if items is None:
        raise BadRow("missing label")
    out = [class_label(v) for v in items]
    if any(v is None for v in out):
        raise BadRow(f"an empty label in {value!r}")
    return tuple(dict.fromkeys(out))                  # each label once, in the row's order


# --------------------------------------------------------------------------------------------
# Rows -> examples, one function per type


def _texts(card, fields: Mapping[str, Any]) -> tuple[str, str | None]:
    first = text_value(fields, card.text[0])
    return first, (text_value(fields, card.text[1]) if len(card.text) > 1 else None)


def _classification(card, fields, guid: str, labelled: bool):
    a, b = _texts(card, fields)
    if not labelled:
        return GlueExample(guid, a, b, None)
    label = class_label(field(fields, card.label))
    if label is None:
        raise BadRow("missing label")
    return GlueExample(guid, a, b, label)


def _regression(card, fields, guid: str, labelled: bool):
    a, b = _texts(card, fields)
    return GlueExample(guid, a, b, float_label(field(fields, card.label)) if labelled else None)


def _multilabel(card, fields, guid: str, labelled: bool):
    a, b = _texts(card, fields)
    return MultiLabelExample(guid, a, b, label_list(field(fields, card.label), card.label_delimiter)
                             if labelled else None)


def _token(card, fields, guid: str, labelled: bool):
    words = listish(field(fields, card.text[0]), " ")
    if not words:
        raise BadRow(f"no tokens in {card.text[0]!r}")
    words = [str(w) for w in words]
    if any(not w.strip() for w in words):
        raise BadRow(f"an empty token in {card.text[0]!r}")
    if not labelled:
        return ner.NerExample(guid, tuple(words), ("O",) * len(words))
    tags = listish(field(fields, card.label), " ")
    if tags is None:
        raise BadRow("missing tags")
    tags = [str(t).strip() for t in tags]
    if len(tags) != len(words):
        raise BadRow(f"{len(words)} tokens but {len(tags)} tags")
    for tag in tags:
        try:
            metrics.get_entities([tag])
        except ValueError:
            raise BadRow(f"tag {tag!r} is not O or B-/I-/E-/S- and a type") from None
    return ner.NerExample(guid, tuple(words), tuple(ner.to_iob2(tags)))


def _answers(value: Any) -> list[tuple[str, int]]:
    """(text, answer_start) pairs from {text: [..], answer_start: [..]} (Hugging Face's SQuAD
    layout), a list of {text, answer_start} objects, or one such object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(f"answers {value[:60]!r} are not JSON") from None
    if isinstance(value, Mapping):
        texts, starts = value.get("text"), value.get("answer_start")
        if isinstance(texts, (str, int)) or texts is None:
            texts, starts = ([] if texts is None else [texts]), ([] if starts is None else [starts])
        texts, starts = listish(texts) or [], listish(starts) or []
        if len(texts) != len(starts):
            raise BadRow(f"{len(texts)} answer texts but {len(starts)} answer_start values")
        return list(zip(map(str, texts), starts))
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        out = []
        for item in listish(value) or []:
            if not isinstance(item, Mapping) or "text" not in item or "answer_start" not in item:
                raise BadRow("an answer is not an object with text and answer_start")
            out.append((str(item["text"]), item["answer_start"]))
        return out
    raise BadRow("missing answers")


def _span(card, fields, guid: str, labelled: bool):
    question, context = text_value(fields, card.text[0]), text_value(fields, card.text[1])
    qid = str(fields.get("id") or guid)
    answers: list[squad.Answer] = []
    if labelled:
        for text, start in _answers(field(fields, card.label)):
            if isinstance(start, float) and start.is_integer():
                start = int(start)
            if not isinstance(start, int) or context[start:start + len(text)] != text:
                raise BadRow(f"answer {text[:40]!r} is not the context at answer_start={start!r}")
            answers.append(squad.Answer(text, start))
    return squad.SquadExample(qid, "", question, context, tuple(answers), is_impossible=labelled and not answers)


def _multiple_choice(card, fields, guid: str, labelled: bool):
    context = text_value(fields, card.text[0])
    start = text_value(fields, card.text[1]) if len(card.text) > 1 else ""
    choices = listish(field(fields, card.choices), "|")
    if not choices or len(choices) < 2:
        raise BadRow(f"fewer than two choices in {card.choices!r}")
    choices = [str(c) for c in choices]
    label = None
    if labelled:
        raw = class_label(field(fields, card.label))
        if raw is None:
            raise BadRow("missing label")
        if not _INTEGER.fullmatch(raw) or not 0 <= int(raw) < len(choices):
            raise BadRow(f"label {raw!r} is not the index of one of the {len(choices)} choices")
        label = int(raw)
    return SwagExample(guid, context, start, tuple(choices), label)


CONVERTERS = {"classification": _classification, "regression": _regression, "multilabel": _multilabel,
              "token": _token, "span": _span, "multiple_choice": _multiple_choice}


def records(card, url: str) -> Iterator[files.Row]:
    """The records of `url` (`files.read_rows`), a CoNLL column file's sentences under the card's
    own token and tag fields: a column file has no header to name them, and one card may read its
    train split from JSONL lists (`text: words`, `label: ner`) and its test split from columns."""
    stream = files.read_rows(url, card.file_format)
    if files.format_of(url, card.file_format) != "conll":
        return stream
    names = {"tokens": card.text[0], "tags": card.label}
    return (row if row.fields is None else files.Row(row.line, {names[k]: v for k, v in row.fields.items()})
            for row in stream)


def rows(card, url: str, *, labelled: bool) -> Iterator[tuple[int, Any, str | None]]:
    """(line, example, None) or (line, None, problem) for every record of `url`, in file order."""
    kind = files.format_of(url, card.file_format)
    if kind == "squad":                               # one JSON document: read whole, strictly, by SQuAD's reader
        files.open_file(url).close()                  # a missing file says so, in the card's terms
        examples, _ = squad.read_squad(url)
        for example in examples:
            yield 0, example, None
        return
    convert = CONVERTERS[card.type]
    for row in records(card, url):
        if row.fields is None:
            yield row.line, None, row.problem
            continue
        try:
            yield row.line, convert(card, row.fields, str(row.line), labelled), None
        except BadRow as exc:
            yield row.line, None, str(exc)


# --------------------------------------------------------------------------------------------
# The held-out dev split


def stratum(card, example: Any) -> str:
    """What the held-out split is stratified by: the class (classification), else one stratum."""
    return str(example.label) if card.type == "classification" else ""


def held_out(seed: int, stratum_key: str, index: int) -> bool:
    """Whether the `index`-th row (0-based) of a stratum goes to dev: one of each run of ten,
    at a position drawn from (seed, stratum, run)."""
    run, position = divmod(index, HOLDOUT_RUN)
    digest = hashlib.blake2b(f"{seed}\x1f{stratum_key}\x1f{run}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HOLDOUT_RUN == position


def split_rows(card, url: str, split: str) -> Iterator[tuple[int, Any, str | None]]:
    """`rows` of the file behind `split`; without a dev file, train's rows minus the held-out
    ones (split train) or those alone (split dev). The file's bad rows then come out with train."""
    labelled = split != "test" or bool(card.test_labelled)
    stream = rows(card, url, labelled=labelled)
    if not (card.holdout and split in ("train", "dev")):
        yield from stream
        return
    counts: dict[str, int] = {}
    for line, example, problem in stream:
        if example is None:               # a bad row of the file: counted once, with train
            if split == "train":
                yield line, example, problem
            continue
        key = stratum(card, example)
        index = counts[key] = counts.get(key, -1) + 1
        if held_out(card.holdout_seed, key, index) == (split == "dev"):
            yield line, example, problem


def read_split(spec, path: str, split: str) -> tuple[list, dict[str, int]]:
    """The family reader of a card's task (`Family.read_own`): the good examples of `split` and the
    counts `rows` (kept) and `skipped` (bad rows and, as their labels are unknown to the task,
    rows the driver's check already refused)."""
    card = spec.source
    known = set(spec.labels)
    examples, counts = [], {"rows": 0, "skipped": 0}
    for _, example, _problem in split_rows(card, path, split):
        if example is None or not _labels_known(card, example, known):
            counts["skipped"] += 1
            continue
        examples.append(example)
    counts["rows"] = len(examples)
    return examples, counts


def _labels_known(card, example: Any, known: set[str]) -> bool:
    if card.type == "classification":
        return example.label is None or example.label in known
    if card.type == "multilabel":
        return example.labels is None or all(label in known for label in example.labels)
    if card.type == "token":
        return all(tag in known for tag in example.tags)
    return True


def fingerprint(card, example: Any) -> int:
    """A 64-bit hash of what an example says (its texts, not its label): equal rows in train and
    dev leak the answer into the dev score."""
    if card.type == "token":
        parts: Sequence[str] = (" ".join(example.words),)
    elif card.type == "span":
        parts = (example.question, example.context)
    elif card.type == "multiple_choice":
        parts = (example.context, example.start, *example.endings)
    else:
        parts = (example.text_a, example.text_b or "")
    digest = hashlib.blake2b("\x1f".join(p.strip() for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


__all__ = ["BadRow", "CONVERTERS", "class_label", "fingerprint", "float_label", "held_out", "label_list",
           "listish", "read_split", "records", "rows", "split_rows", "stratum"]
