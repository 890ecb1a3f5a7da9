"""No import circles inside the snaketune package: every ``import`` of a snaketune module, at the top of a file or
inside a function, read with ``ast``, makes an edge, and the graph must be acyclic. A circle that happens to work
today (one side importing inside a function) breaks as soon as someone moves an import to the top."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "scripts" / "snaketune"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package ``root`` it imports (``from pkg import sub`` names the submodule)."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":  # on the current path: back to where the circle starts
                here = path + [node]
                return here[here.index(target):] + [target]
            if target not in state and (found := visit(target, path + [node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_snaketune_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert "snaketune.config" in graph and "snaketune.train.recipe" in graph
    assert "snaketune.train.distributed" in graph["snaketune.train.checkpoints"]  # `from snaketune.train import x`
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_config_imports_no_stage_module():
    stages = {"snaketune." + name for name in ("download", "dataset", "replay", "merge", "predict", "evaluate",
                                                "exam", "export", "report", "serve", "plan")}
    imported = import_graph(PACKAGE)["snaketune.config"]
    assert not imported & stages and not any(name.startswith("snaketune.train") for name in imported), imported


def test_a_circle_through_a_function_local_import_is_found(tmp_path):
    package = tmp_path / "snaketune"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "config.py").write_text("from snaketune.train import recipe\n")
    (package / "layout.py").write_text("def paths():\n    from snaketune import config\n")
    (package / "train" / "recipe.py").write_text("from ..layout import paths\n")
    cycle = find_cycle(import_graph(package))
    assert cycle == ["snaketune.config", "snaketune.train.recipe", "snaketune.layout", "snaketune.config"]
