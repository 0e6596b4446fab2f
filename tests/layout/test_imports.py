"""The package's import graph runs one way: ``models/`` at the bottom, no two parts leaning on each other.

Read from the source with ``ast`` (imports inside functions count too), so the check covers lazy imports
that a run-time check would miss.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "llmshearing"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# (importing part, imported part) -> ["path:line: import statement", ...]
Edges = dict[tuple[str, str], list[str]]


def part_of(module: str) -> str | None:
    """The top-level folder or module of ``llmshearing.<part>...``; None for the package itself or others."""
    names = module.split(".")
    if names[0] != PACKAGE or len(names) < 2:
        return None
    return names[1]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Absolute names a statement imports (``from a import b`` counts ``a.b``, which may be a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join([*base, node.module] if node.module else base)
    else:
        stem = node.module or ""
    return [stem, *(f"{stem}.{alias.name}" for alias in node.names)]


def import_edges() -> Edges:
    """Every import between two different parts of the package, with where it is written."""
    edges: Edges = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        source_part = part_of(importer) if "." in importer else None
        if source_part is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = {part_of(m) for m in imported_modules(node, importer, path.name == "__init__.py")}
            for target in targets - {None, source_part}:
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}"
                if where not in edges[(source_part, target)]:
                    edges[(source_part, target)].append(where)
    return edges


def describe(edges: Edges, pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"{a} -> {b}:\n  " + "\n  ".join(edges[(a, b)]) for a, b in pairs)


def test_the_graph_sees_known_imports() -> None:
    edges = import_edges()
    assert ("pruning", "models") in edges  # the fold imports the decoder
    assert ("train", "training") in edges  # inside a function of train.py
    assert part_of("llmshearing.models.decoder") == "models"
    assert part_of("llmshearing") is None and part_of("torch.nn") is None


def test_models_import_no_other_part_of_the_package() -> None:
    edges = import_edges()
    found = sorted(pair for pair in edges if pair[0] == "models")
    assert not found, "models/ must import only itself:\n" + describe(edges, found)


def test_no_two_parts_import_each_other() -> None:
    edges = import_edges()
    both_ways = sorted((a, b) for a, b in edges if a < b and (b, a) in edges)
    pairs = [pair for a, b in both_ways for pair in ((a, b), (b, a))]
    assert not pairs, "parts that import each other:\n" + describe(edges, pairs)


def test_data_sits_below_dynamic_loading() -> None:
    """``data/`` reads plain values (domain names, proportions, an interval), never the mixing config."""
    edges = import_edges()
    assert ("dynamic_loading", "data") in edges  # the callback drives the dataset
    assert ("data", "dynamic_loading") not in edges, describe(edges, [("data", "dynamic_loading")])


def test_the_data_loading_key_is_defined_once() -> None:
    """Only ``dynamic_loading/config.py`` assigns the string ``callbacks.data_loading`` to a name."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            value = getattr(node, "value", None)
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(value, ast.Constant):
                if value.value == "callbacks.data_loading":
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert len(found) == 1 and found[0].startswith(f"{PACKAGE}/dynamic_loading/config.py:"), found


@pytest.mark.parametrize("folder", ["pruning", "dynamic_loading"])
def test_readme_lists_every_module(folder: str) -> None:
    readme = (ROOT / folder / "README.md").read_text(encoding="utf-8")
    listed = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `") and ".py`" in line}
    modules = {path.name for path in (ROOT / folder).glob("*.py") if path.name != "__init__.py"}
    assert listed == modules, (
        f"missing from the table: {sorted(modules - listed)}; gone: {sorted(listed - modules)}"
    )


def test_the_checkpoint_layer_sits_below_the_conversions() -> None:
    """``hf/`` (key maps, config mapping) imports only ``models/``; ``checkpoint/`` reads and writes checkpoints
    with ``hf/`` and ``models/`` and imports nothing that converts, trains, prunes or evaluates; ``convert/``
    (the HF import and export) stands on both, and neither imports it."""
    edges = import_edges()
    assert ("checkpoint", "hf") in edges and ("convert", "checkpoint") in edges and ("convert", "hf") in edges
    hf = sorted(pair for pair in edges if pair[0] == "hf" and pair[1] != "models")
    assert not hf, "hf/ must import only models/:\n" + describe(edges, hf)
    below = {"hf", "models", "io", "recipe_file", "config_base"}
    found = sorted(pair for pair in edges if pair[0] == "checkpoint" and pair[1] not in below)
    assert not found, f"checkpoint/ may import only {sorted(below)}:\n" + describe(edges, found)


def test_pruning_checkpoints_are_refused_in_one_place() -> None:
    """Only ``checkpoint/format.py`` raises when any tensor name has the ``l0_module.`` prefix; every reader
    that would use the weights alone refuses a pruning checkpoint through its ``refuse_pruning_checkpoint``."""
    callers = set()
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "refuse_pruning_checkpoint":
                callers.add(str(path.relative_to(ROOT.parent)))
            refuses = isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body)
            test = ast.unparse(node.test) if refuses else ""
            if "any(" in test and any(name in test for name in ("'l0_module.'", "L0_PREFIX")):
                assert path.relative_to(ROOT) == Path("checkpoint/format.py"), (
                    f"{path}:{node.lineno} refuses a pruning checkpoint itself"
                )
    expected = {
        "llmshearing/checkpoint/loading.py",
        "llmshearing/convert/project_to_hf.py",
        "llmshearing/harness/model.py",
        "llmshearing/pruning/oneshot.py",
        "llmshearing/shape_search/search.py",
        "llmshearing/training/builders.py",
    }
    assert callers == expected, sorted(callers ^ expected)


@pytest.mark.parametrize("folder", ["checkpoint", "hf", "convert"])
def test_package_docstring_names_every_module(folder: str) -> None:
    """The checkpoint, HF and conversion packages say in ``__init__.py`` what each of their modules holds."""
    doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = {path.stem for path in (ROOT / folder).glob("*.py") if path.name != "__init__.py"}
    missing = sorted(name for name in modules if f"``{name}``" not in doc)
    assert not missing, f"{folder}/__init__.py does not name {missing}"


# What the package root holds: its entry points, and the little every entry point shares. Every other
# module belongs to a part (a folder), as the layout in the README says.
ROOT_MODULES = {
    "__init__.py": "the package",
    "cli.py": "the `llmshearing` command",
    "train.py": "`composer llmshearing/train.py <recipe>` and `python -m llmshearing.train`",
    "demo.py": "`make demo` (`python -m llmshearing.demo`)",
    "evaluate.py": "the `llmshearing evaluate` command",
    "report.py": "the `llmshearing report` command",
    "errors.py": "how every entry point tells a fault and the exit status it ends with",
    "config_base.py": "what every config section is built on (ConfigError, durations in batches, unknown keys "
    "with the closest valid one, dataclass sections from mappings): the bottom of the package, importing none of it",
    "recipe_file.py": "reading a recipe YAML into keys or a ConfigError: the bottom layer that training/, "
    "checkpoint/, callbacks/ and the commands share (inside training/ it would make checkpoint/ and training/ "
    "import each other)",
}


def test_the_package_root_holds_entry_points_only() -> None:
    found = {path.name for path in ROOT.glob("*.py")}
    assert found == set(ROOT_MODULES), (
        f"not entry points (move them into a part): {sorted(found - set(ROOT_MODULES))}; "
        f"gone: {sorted(set(ROOT_MODULES) - found)}"
    )


def test_the_benchmarks_do_not_import_the_demo() -> None:
    """What the benchmarks share with ``make demo`` (the recipes, the corpus, the SmolLM2 GGUF) lives in the
    part that owns it; nothing under ``bench/`` imports ``llmshearing.demo``, at the top or inside a function."""
    bench = ROOT.parent / "bench"
    found = []
    for path in sorted(bench.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [] if getattr(node, "level", 0) else imported_modules(node, "", False)
                if f"{PACKAGE}.demo" in names or any(n.startswith(f"{PACKAGE}.demo.") for n in names):
                    found.append(f"{path.relative_to(bench.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert bench.is_dir() and not found, "\n".join(found)


# Test folders that are not a part of the package: what each of them tests.
TEST_FOLDERS_BESIDE_THE_PARTS = {
    "bench": "the benchmarks under bench/",
    "entry_points": "the modules of the package root (ROOT_MODULES)",
    "layout": "the package's layout and import rules (this file)",
}


def test_every_test_file_lives_in_the_folder_of_what_it_tests() -> None:
    """``tests/`` mirrors the package: every test file sits in a folder named after a part of the package
    (``tests/pruning/`` for ``llmshearing/pruning/``) or in one of the few others, and no two share a name (the
    test folders are all on ``sys.path``, so a module is imported by its name alone)."""
    tests = Path(__file__).resolve().parents[1]
    parts = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    allowed = parts | set(TEST_FOLDERS_BESIDE_THE_PARTS)
    files = sorted(tests.rglob("test_*.py"))
    misplaced = [
        str(path.relative_to(tests))
        for path in files
        if len(path.relative_to(tests).parts) != 2 or path.parent.name not in allowed
    ]
    assert files and not misplaced, f"not in tests/<part>/ (parts: {sorted(allowed)}): {misplaced}"
    names = defaultdict(list)
    for path in files:
        names[path.name].append(str(path.relative_to(tests)))
    same_name = [found for found in names.values() if len(found) > 1]
    assert not same_name, f"test files that share a name: {same_name}"
    assert not set(TEST_FOLDERS_BESIDE_THE_PARTS) & parts, "a folder beside the parts is now a part"


def module_graph(folder: str) -> dict[str, dict[str, list[str]]]:
    """The modules of ``llmshearing/<folder>`` and, for each, the modules of the folder it imports (at the top
    or inside a function) with where: ``{importer: {imported: ["path:line: statement", ...]}}``."""
    package = f"{PACKAGE}.{folder}"
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        importer = module_name(path)
        found: dict[str, list[str]] = defaultdict(list)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_modules(node, importer, path.name == "__init__.py"):
                parts = name.split(".")
                if (
                    name.startswith(f"{package}.")
                    and len(parts) >= 3
                    and (ROOT / folder / f"{parts[2]}.py").is_file()
                ):
                    target = ".".join(parts[:3])
                    if target != importer:
                        found[target].append(
                            f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}"
                        )
        graph[importer] = dict(found)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """One cycle of ``graph`` as the modules along it (first == last), or [] when there is none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every module below it is seen
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def test_the_graph_of_a_folder_sees_known_imports() -> None:
    graph = module_graph("training")
    assert "llmshearing.training.run_config" in graph["llmshearing.training.config"]
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}, "c": {"a": []}}) == []


def test_no_import_cycle_in_training() -> None:
    """The modules of ``training/`` import each other one way: the run config at the bottom, validation above
    it, the builders above both; an import inside a function counts as much as one at the top."""
    graph = module_graph("training")
    cycle = find_cycle(graph)
    steps = [f"{a} -> {b}:\n  " + "\n  ".join(graph[a][b]) for a, b in itertools.pairwise(cycle)]
    assert not cycle, "modules of training/ that import each other in a circle:\n" + "\n".join(steps)


# what checks a recipe, plans a run or reads a run's files: answering bad input must not wait for Composer's import
COMPOSER_FREE = (
    "llmshearing.train",
    "llmshearing.training.config",
    "llmshearing.training.fsdp_settings",
    "llmshearing.training.run_folder",
    "llmshearing.training.metrics_log",
    "llmshearing.planning.plan",
    "llmshearing.planning.preflight",
    "llmshearing.report",
)


def test_what_checks_a_recipe_or_reads_a_run_imports_no_composer() -> None:
    import subprocess
    import sys

    probe = "import importlib, sys\n" + "".join(
        f"importlib.import_module({name!r}); print({name!r}, 'composer' in sys.modules)\n"
        for name in COMPOSER_FREE
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pulled = [line.split()[0] for line in done.stdout.splitlines() if line.endswith("True")]
    assert len(done.stdout.splitlines()) == len(COMPOSER_FREE) and not pulled, done.stdout
