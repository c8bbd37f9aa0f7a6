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


GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FILE_SUFFIXES = {".safetensors", ".lease", ".json", ".bin", ".txt", ".pt", ".npz", ".yaml", ".md", ".png"}


def test_every_link_and_file_the_guides_name_exists():
    """Markdown links and pictures resolve, and every repository path in backticks (a file or folder
    of bertray/, flows/, benchmarks/, docs/, clusters/, samples/, tests/) is there."""
    broken = []
    for guide in GUIDES:
        text = guide.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" not in target and not target.startswith("#"):
                if not (guide.parent / target.split("#")[0]).exists():
                    broken.append(f"{guide.name}: link {target}")
        for path in re.findall(r"`((?:bertray|flows|benchmarks|docs|clusters|samples|tests)/[\w./-]*)`", text):
            if "{" not in path and not path.startswith("benchmarks/results/") and not (REPO / path).exists():
                broken.append(f"{guide.name}: {path}")
    assert not broken, broken


def test_every_flag_the_guides_name_is_a_config_key():
    """`--section.key` flags and `section.key` config keys in the guides are fields of the pretraining
    config: a renamed field cannot leave the docs behind (file names such as `model.safetensors` aside)."""
    from bertray.cli import iter_options
    from bertray.train.config import PretrainConfig

    keys = {dotted for dotted, _, _ in iter_options(PretrainConfig)}
    unknown = set()
    for guide in GUIDES:
        for key in re.findall(r"`(?:--)?((?:model|data|train|scaling|run)\.[a-z_]+)", guide.read_text()):
            if key not in keys and Path(key).suffix not in FILE_SUFFIXES:
                unknown.add(f"{guide.name}: {key}")
    assert not unknown, sorted(unknown)
