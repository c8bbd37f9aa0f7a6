"""README's layout table names every module of the library, and nothing that is not there."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_layout_table_matches_the_tree():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout"):]
    named: set[Path] = set()
    for cell in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        folder = REPO
        for path in re.findall(r"`([^`]+)`", cell):
            head, _, brace = path.partition("{")
            if brace:                                   # bertray/train/{optim,checkpoints}.py
                names, _, tail = brace.partition("}")
                named |= {REPO / f"{head}{name}{tail}" for name in names.split(",")}
            elif "/" in path:
                named.add(REPO / path)
                folder = (REPO / path).parent
            elif path.endswith(".py"):                  # `bertray/train/resources.py`, `stall.py`
                named.add(folder / path)
    missing = [p for p in named if not p.exists()]
    assert not missing, f"the layout table names what is not in the tree: {missing}"
    modules = [p for p in (REPO / "bertray").rglob("*.py") if p.name != "__init__.py"]
    covered = [m for m in modules if m in named or any(d.is_dir() and d in m.parents for d in named)]
    assert sorted(set(modules) - set(covered)) == [], "modules without a row in README's layout table"
