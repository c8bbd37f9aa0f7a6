"""README's layout table names every module of the library, and nothing that is not there; the README
and the modules stay short; the guides name only what exists; and the library's layers import only
downwards, Ray only where it is driven."""

import functools
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


def test_the_front_page_and_the_modules_stay_short():
    """The README is a front page (reference goes to docs/), and a module over 450 lines is doing
    more than one job: split it along its seams rather than raise the limit."""
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 200, f"README.md has {len(readme)} lines: move reference into docs/"
    assert [n for n, line in enumerate(readme, 1) if len(line) > 300] == [], "README lines over 300 characters"
    long = {str(p.relative_to(REPO)): n for p in (REPO / "bertray").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}, f"modules over 450 lines: {long}"


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


# --------------------------------------------------------------------------------------------
# Layering: who may import whom (every import, also those inside functions and TYPE_CHECKING)

LOWER_PACKAGES = {               # package -> what it must not import
    "bertray.data": ("bertray.train", "bertray.tune"),
    "bertray.model": ("bertray.train", "bertray.tune"),
    "bertray.tasks": ("bertray.train", "bertray.tune"),
    "bertray.predict": ("bertray.train", "bertray.tune"),
    "bertray.serve": ("bertray.train", "bertray.tune"),
    # what training, tuning and prediction share (batches, autocast, the checkpoint cache) sits below all three
    "bertray.runtime": ("bertray.train", "bertray.tune", "bertray.predict", "bertray.serve"),
}

RAY_MODULES = {                  # the modules that may import Ray, and why
    "bertray/data/pipeline.py": "the Ray Data pipeline (read tasks, tokenizer actors)",
    "bertray/train/pretrain.py": "the pretraining driver: the TorchTrainer, the cluster check, actors on its node",
    "bertray/train/worker_loop.py": "the Train worker loop: Ray Train's worker context, dataset shards, DDP",
    "bertray/train/worker_checkpoints.py": "the workers' checkpoint reports and resume (ray.train.report, Checkpoint)",
    "bertray/train/console.py": "the driver's console: an actor the workers' log lines go through",
    "bertray/train/metrics.py": "the workers' metric sinks: Ray's metrics (Prometheus gauges)",
    "bertray/train/stall.py": "the batch-wait watchdog's diagnosis: Ray's cluster resources and state API",
    "bertray/tune/sweep.py": "the fine-tuning sweep on Ray Tune",
    "bertray/predict/job.py": "batch prediction on Ray Data",
    "bertray/serve/app.py": "online prediction on Ray Serve",
    "bertray/cli.py": "start_ray: the flows join a cluster or start a local Ray",
}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it: `from a.b import c` gives a.b and a.b.c."""
    import ast

    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                    # relative: from the module's own package up
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.cache
def _modules() -> dict[str, set[str]]:
    return {p.relative_to(REPO).as_posix(): _imports(p) for p in sorted((REPO / "bertray").rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_lower_layers_never_import_the_higher_ones():
    """data, model and tasks know nothing of training or tuning; prediction and serving neither;
    the shared runtime helpers know none of their users."""
    broken = []
    for path, imported in _modules().items():
        module = path.removesuffix(".py").replace("/", ".")
        for package, forbidden in LOWER_PACKAGES.items():
            if _under(module, package):
                broken += [f"{path} imports {name}" for name in sorted(imported)
                           if any(_under(name, f) for f in forbidden)]
    assert not broken, broken


def test_only_the_ray_facing_modules_import_ray():
    """Ray is imported by the few modules that drive it (see RAY_MODULES for why each); every other
    module of bertray is plain Python, testable and readable without a cluster."""
    modules = _modules()
    importing = {path for path, imported in modules.items() if any(_under(name, "ray") for name in imported)}
    assert sorted(importing - set(RAY_MODULES)) == [], "import Ray outside the modules allowed to (RAY_MODULES)"
    assert sorted(set(RAY_MODULES) - importing) == [], "RAY_MODULES lists modules that no longer import Ray"
