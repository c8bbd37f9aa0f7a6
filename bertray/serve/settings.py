"""What one service deployment is given: the model and the limits of a request and a batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from bertray.config import check_no_credentials, doc, from_mapping
from bertray.errors import check


@dataclass(frozen=True)
class ServeSettings:
    model: str = doc("", "fine-tuned model folder in the Hugging Face layout (local or object storage)")
    batching: bool = doc(True, "dynamic batching: requests that arrive together share one forward pass")
    max_batch_size: int = doc(32, "most requests in one batch")
    batch_wait_timeout_s: float = doc(0.01, "longest wait for a batch to fill after its first request")
    forward_batch_size: int = doc(64, "sequences per forward pass inside a batch (sorted by length)")
    max_items: int = doc(64, "most texts or pairs in one request")
    max_text_chars: int = doc(20_000, "longest text, question or context accepted, in characters")
    max_body_bytes: int = doc(4 << 20, "largest request body accepted")
    max_seq_len: int | None = doc(None, "tokens per input, longer ones truncated (null: the length it was "
                                        "fine-tuned at, else 128, 384 for QA); a token tagger tags longer texts "
                                        "in windows of this many tokens instead")
    threads: int = doc(1, "torch threads per replica")
    device: str | None = doc(None, "torch device (null: a GPU if the replica has one)")
    cache_dir: str | None = doc(None, "node-local cache for a downloaded model")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "give the fine-tuned model folder")
        check_no_credentials("model", self.model)
        for key in ("max_batch_size", "forward_batch_size", "max_items", "max_text_chars", "max_body_bytes",
                    "threads"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                  f"must be a positive integer, got {value!r}")
        check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s",
              f"must be in [0, 10] seconds, got {self.batch_wait_timeout_s!r}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServeSettings":
        """From a Serve config's `args` (YAML values), unknown keys refused with the known ones named."""
        return from_mapping(cls, dict(args))

    def to_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
