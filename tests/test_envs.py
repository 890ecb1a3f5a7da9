"""The per-stage conda envs agree with requirements.txt, and each holds every package its rules' code imports."""

import ast
import importlib.metadata
import re
import sys

import pytest
import yaml

from conftest import REPO

ENVS = sorted((REPO / "envs").glob("*.yaml"))


def pins(lines) -> dict[str, str]:
    """{normalised name: version} of ``name==version`` lines."""
    found = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_pins(path) -> dict[str, str]:
    spec = yaml.safe_load(path.read_text())
    pip = next((item["pip"] for item in spec["dependencies"] if isinstance(item, dict)), [])
    conda = [item.replace("=", "==", 1) for item in spec["dependencies"] if isinstance(item, str) and "=" in item]
    return pins(pip + [c for c in conda if not c.startswith("python")])


REQUIREMENTS = pins((REPO / "requirements.txt").read_text().splitlines())


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_env_pins_the_same_versions_as_requirements(env):
    spec = yaml.safe_load(env.read_text())
    assert "python =3.11" in spec["dependencies"]
    pinned = env_pins(env)
    assert pinned, f"{env.name} pins nothing"
    mismatched = {name: (version, REQUIREMENTS.get(name)) for name, version in pinned.items()
                  if REQUIREMENTS.get(name) != version}
    assert not mismatched, f"{env.name} vs requirements.txt: {mismatched}"


def test_requirements_are_what_the_tests_run_on():
    """requirements.txt is the tested set: the interpreter running these tests has exactly those versions."""
    installed = {name: importlib.metadata.version(name) for name in REQUIREMENTS}
    torch_local = installed["torch"].split("+")[0]  # a CPU or CUDA build of the same release
    installed["torch"] = torch_local
    assert installed == REQUIREMENTS


def module_level(tree):
    """Nodes outside function bodies: what runs on import (a function's own imports run only when it is called)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(ast.iter_child_nodes(node))


def imported_modules(path, seen=None) -> set[str]:
    """Third-party top-level modules a stage script imports anywhere, plus those its snaketune modules import
    on import, recursively."""
    entry = seen is None
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    found = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if entry else module_level(tree)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]  # a name may be a module
        for name in names:
            top = name.split(".")[0]
            if top == "snaketune":
                base = REPO / "scripts" / name.replace(".", "/")
                for module in (base.with_suffix(".py"), base / "__init__.py"):  # a module, or a package
                    found |= imported_modules(module, seen) if module.exists() else set()
            elif top not in sys.stdlib_module_names:
                found.add(top)
    return found


def rule_envs() -> dict[str, tuple[str, str]]:
    """rule name -> (env file, stage script) as the rule files declare them."""
    table = {}
    for rules in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule )", rules.read_text()):
            rule = re.match(r"rule (\w+):", block)
            env = re.search(r'conda:\s*\n\s*"\.\./envs/([\w.]+)"', block)
            script = re.search(r'shell:\s*\n\s*"(\w+)\.py ', block)  # scripts are on PATH: `train.py ...`
            if rule and env and script:
                table[rule.group(1)] = (env.group(1), script.group(1))
    return table


def test_every_rule_has_an_env_holding_what_its_script_imports():
    table = rule_envs()
    assert set(table) >= {"download", "dataset", "train", "merge", "predict",
                          "evaluate", "report"}
    distributions = importlib.metadata.packages_distributions()
    for rule, (env, script) in table.items():
        pinned = env_pins(REPO / "envs" / env)
        needed = {normalise(dist) for module in imported_modules(REPO / "scripts" / f"{script}.py")
                  for dist in distributions.get(module, [module])}
        missing = needed - set(pinned) - {"snakemake"}
        assert not missing, f"rule {rule}: envs/{env} lacks {sorted(missing)} that scripts/{script}.py imports"


def installable(pins) -> set[str]:
    """What an env built from these pins holds: the pinned distributions and everything they require."""
    from packaging.requirements import Requirement

    seen, stack = set(), list(pins)
    while stack:
        name = normalise(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(requirement.name)
    return seen


def test_every_job_of_the_demo_imported_only_what_its_rules_env_installs(demo):
    """An audit of what each job's code really imported, function bodies included (the dataset stage imports
    matplotlib only to draw its length plot): the demo ran with tests/import_audit/sitecustomize.py, which
    records the imports made by code under scripts/ in every process, per stage script."""
    import json

    distributions = importlib.metadata.packages_distributions()
    records = {}
    for path in (demo / "import_audit").glob("*.json"):
        records.setdefault(path.stem.rsplit("-", 1)[0], set()).update(json.loads(path.read_text()))
    checked = set()
    for rule, (env, script) in rule_envs().items():
        if script not in records:
            continue
        needed = {normalise(dist) for module in records[script] - set(sys.stdlib_module_names)
                  for dist in distributions.get(module, [])}
        missing = needed - installable(env_pins(REPO / "envs" / env)) - {"snakemake"}
        assert not missing, f"rule {rule}: scripts/{script}.py imported {sorted(missing)}, not in envs/{env}"
        checked.add(rule)
    assert checked >= {"download", "dataset", "train", "merge", "predict", "evaluate", "exam", "report"}
