"""What every benchmark does last: its numbers as JSON beside the table it printed.

Scripts import this from `main()` (`python benchmarks/x.py` puts this folder on the path; the tests
that load a benchmark's functions do not run `main`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON at `path` (its folder made), numpy and torch scalars as floats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {path}")
