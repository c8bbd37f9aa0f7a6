"""Tagged tokens -> entities: character spans of the text with their tag, grouped as `transformers`'
token-classification pipeline groups them with `aggregation_strategy="simple"`.

Pure functions (no model, no tokenizer, no Ray), so the rules can be checked on their own and
kept equal to the pipeline's, which users compare against:

- every token (special tokens left out by the caller) carries its arg-max tag and that tag's
  probability; "sub-word" tokens are not merged into their word first ("simple" does not);
- neighbouring tokens join one group when their tag's type is the same and the later one is not
  a `B-` tag. `B-X`/`I-X` are (B, X)/(I, X); a tag without such a prefix, `O` included, is
  (I, itself), so a run of `PER` (IO tagging) or of `O` is one group;
- a group's `entity_group` is its first tag after the first `-` (`B-PER` -> `PER`), its `score`
  the mean of its tokens' scores, its `word` the tokens joined by the tokenizer's decoder, and
  `start`/`end` the first token's start and the last token's end;
- groups whose `entity_group` is in `ignore` (`O`) are dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, NamedTuple, Sequence


class TaggedToken(NamedTuple):
    """One token of the text: its arg-max tag, that tag's probability, the token's text (the
    vocabulary entry, e.g. `##ing`; for an unknown token the characters it covers) and its
    character span [start, end) in the text."""

    tag: str
    score: float
    word: str
    start: int
    end: int


@dataclass(frozen=True)
class Entity:
    """One group of tokens, with the keys and meaning of the pipeline's output."""

    entity_group: str
    score: float
    word: str
    start: int
    end: int

    def as_dict(self) -> dict:
        return asdict(self)


def split_tag(tag: str) -> tuple[str, str]:
    """(`B` | `I`, type): `B-PER` -> (B, PER), `I-PER` -> (I, PER), `PER` or `O` -> (I, itself)."""
    if tag.startswith("B-"):
        return "B", tag[2:]
    if tag.startswith("I-"):
        return "I", tag[2:]
    return "I", tag


def group_entities(tokens: Iterable[TaggedToken], join: Callable[[list[str]], str] = " ".join, *,
                   ignore: Sequence[str] = ("O",)) -> list[Entity]:
    """The entities of one text's tokens (in text order). `join` turns a group's token texts into
    its `word` (the tokenizer's decoder: WordPiece drops the `##` of continuations)."""
    groups: list[list[TaggedToken]] = []
    for token in tokens:
        if groups:
            prefix, kind = split_tag(token.tag)
            if kind == split_tag(groups[-1][-1].tag)[1] and prefix != "B":
                groups[-1].append(token)
                continue
        groups.append([token])
    entities = (_entity(group, join) for group in groups)
    return [e for e in entities if e.entity_group not in ignore]


def _entity(group: list[TaggedToken], join: Callable[[list[str]], str]) -> Entity:
    return Entity(entity_group=group[0].tag.split("-", 1)[-1], score=sum(t.score for t in group) / len(group),
                  word=join([t.word for t in group]), start=group[0].start, end=group[-1].end)
