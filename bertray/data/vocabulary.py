"""The vocabulary of a pretraining run: the configured one, the one cached in the run directory, or
one trained on (a bounded prefix of) the corpus and cached there, so a resumed run, `inspect_data`
and fine-tuning all see exactly the ids the model was trained with."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

from tokenizers import Tokenizer

from bertray import wordpiece
from bertray.data.documents import CorpusCounters
from bertray.data.formats import read_documents
from bertray.data.sources import CorpusFile
from bertray.storage import exists, join_url

if TYPE_CHECKING:
    from bertray.data.config import DataSection

log = logging.getLogger(__name__)

MAX_TRAINING_SENTENCES = 2_000_000


def corpus_sentences(data: DataSection, files: Sequence[CorpusFile], limit: int) -> Iterator[str]:
    """The corpus's sentences in file order, streamed, at most `limit` of them."""
    layout, counters, count = data.corpus_layout(), CorpusCounters(), 0
    for file in files:
        for doc in read_documents(file, layout, counters, fmt=data.format, storage_options=data.storage_options,
                                  max_bytes=data.max_file_bytes):
            for sentence in doc:
                yield sentence
                count += 1
                if count >= limit:
                    return


def run_tokenizer(data: DataSection, files: Sequence[CorpusFile], run_url: str) -> Tokenizer:
    if data.tokenizer:
        return wordpiece.load(data.tokenizer)
    cached = join_url(run_url, "tokenizer")
    if exists(join_url(cached, "tokenizer.json")):
        log.info("vocabulary: cached %s", cached)
        return wordpiece.load(cached)
    log.info("vocabulary: training a %d-piece WordPiece vocabulary on the corpus", data.vocab_size)
    tok = wordpiece.train(corpus_sentences(data, files, MAX_TRAINING_SENTENCES), vocab_size=data.vocab_size)
    wordpiece.save(tok, cached)
    return tok
