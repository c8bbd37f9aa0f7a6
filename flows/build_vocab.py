"""Train a BERT WordPiece vocabulary on a raw-text corpus and save it as a tokenizer directory.

    python flows/build_vocab.py --corpus ../shared/data/corpus/wikitext-2-raw/ --vocab-size 8000 \\
        --output runs/vocab-8k
    python flows/build_vocab.py --corpus 's3://bucket/wiki/*.txt.gz' --output s3://bucket/vocab-30k

Lines are streamed through fsspec (local paths, globs, directories, s3://, gs://, ...;
.gz/.bz2/.xz/.zst decompressed by extension), one at a time, so the corpus never sits in memory.
The output directory (tokenizer.json, vocab.txt, tokenizer_config.json) is what
`bertray.wordpiece.load` and `flows/pretrain.py` read. No Ray needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterator, Sequence

import fsspec

from bertray import wordpiece
from bertray.data.sources import resolve_corpus
from bertray.errors import BertrayError

MAX_LINE_CHARS = 1 << 20
"""A file without line breaks would otherwise be one line as large as the file."""

PROGRESS_EVERY_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", required=True, metavar="URL",
                        help="files, globs or directories (searched recursively), local or fsspec URLs; "
                             "one text per line, blank lines ignored")
    parser.add_argument("--vocab-size", type=int, default=30522,
                        help="exact number of pieces, the five special tokens included (default: %(default)s, "
                             "BERT's); the run fails if the corpus cannot fill it")
    case = parser.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=True,
                      help="lower-case and strip accents, as uncased BERT (default)")
    case.add_argument("--cased", dest="lowercase", action="store_false",
                      help="keep case and accents, as cased BERT")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="a merge must occur at least this often to enter the vocabulary (default: %(default)s)")
    parser.add_argument("--limit-alphabet", type=int, default=1000,
                        help="keep at most this many distinct characters; rarer ones become [UNK] "
                             "(default: %(default)s)")
    parser.add_argument("--max-lines", type=int, default=None,
                        help="stop after this many non-blank lines (default: the whole corpus)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory (local or fsspec URL) to write tokenizer.json, vocab.txt and "
                             "tokenizer_config.json into")
    return parser


def stream_lines(urls: Sequence[str], max_lines: int | None, progress: dict) -> Iterator[str]:
    """Non-blank lines of every file in turn, with counts in `progress` for the reports."""
    last_report = time.monotonic()
    for url in urls:
        progress["files"] += 1
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
            for line in iter(lambda: f.readline(MAX_LINE_CHARS), ""):
                line = line.strip()
                if not line:
                    continue
                if max_lines is not None and progress["lines"] >= max_lines:
                    return
                progress["lines"] += 1
                progress["chars"] += len(line)
                yield line
                if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    print(f"  {progress['lines']:,} lines, {progress['chars']:,} characters, "
                          f"file {progress['files']}/{len(urls)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_lines is not None and args.max_lines < 1:
        print("error: --max-lines must be at least 1", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        files = [f.url for f in resolve_corpus(args.corpus)]
        print(f"Training a {args.vocab_size:,}-piece {'uncased' if args.lowercase else 'cased'} WordPiece "
              f"vocabulary on {len(files)} file(s)", flush=True)
        progress = {"files": 0, "lines": 0, "chars": 0}
        tok = wordpiece.train(stream_lines(files, args.max_lines, progress), vocab_size=args.vocab_size,
                              lowercase=args.lowercase, min_frequency=args.min_frequency,
                              limit_alphabet=args.limit_alphabet)
        wordpiece.save(tok, args.output)
        check = wordpiece.load(args.output)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    special = wordpiece.special_tokens(check)
    continuations = int(wordpiece.subword_mask(check).sum())
    sample = "The quick brown fox jumped over the lazy dog's tokenization."
    print(f"\nRead {progress['lines']:,} lines ({progress['chars']:,} characters) "
          f"from {progress['files']} file(s) in {time.monotonic() - start:.1f} s")
    print(f"Vocabulary: {check.get_vocab_size():,} pieces, {continuations:,} of them ## continuations; "
          f"[PAD]={special.pad} [UNK]={special.unk} [CLS]={special.cls} [SEP]={special.sep} [MASK]={special.mask}")
    print(f"Sample: {sample!r} -> {check.encode(sample).tokens}")
    print(f"Saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
