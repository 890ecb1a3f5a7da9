"""Workflow config: validation against the JSON schema, defaults, cross-references.

Every problem is reported at once, one line each, as ``file:line: field: what is wrong``, so a user fixes the
whole config in one pass instead of one error per run of Snakemake.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from snaketune.errors import UserError
from snaketune.formats import from_dataset_info
from snaketune.sweeps import expand as expand_sweeps
from snaketune.train import TrainSettings

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.yaml"


# Model keys that only make sense for one source; any other source naming them is a mistake.
SOURCE_KEYS = {
    "builtin": {
        "architecture", "seed", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "initializer_range",
        "tokenizer_corpus",
    },
    "local": {"path", "copy", "convert"},
    "modelscope": {"id", "revision", "cache_dir", "convert"},
    "huggingface": {"id", "revision", "cache_dir", "convert"},
}
SOURCE_REQUIRED = {"builtin": {"tokenizer_corpus"}, "local": {"path"}, "modelscope": {"id"}, "huggingface": {"id"}}
RUN_BLOCKS = ("merge", "generation", "evaluation")


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


class YamlLocator:
    """Finds the line of a key path (``("runs", "a", "learning_rate")``) in the YAML files a config came from."""

    def __init__(self, files: list[str | Path]):
        self.trees = []
        for path in files:
            try:
                self.trees.append((str(path), yaml.compose(Path(path).read_text(encoding="utf-8"))))
            except (OSError, yaml.YAMLError):
                continue

    def where(self, keys: tuple) -> str:
        """Return ``file:line`` of the deepest key of ``keys`` found (later files win), or ``config``."""
        best = None
        for path, root in reversed(self.trees):
            node, line, depth = root, None, 0
            for key in keys:
                if not isinstance(node, yaml.MappingNode):
                    break
                match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
                if match is None:
                    break
                line, node, depth = match[0].start_mark.line + 1, match[1], depth + 1
            if line is not None and (best is None or depth > best[0]):
                best = (depth, f"{path}:{line}")
            if depth == len(keys):
                break
        return best[1] if best else (self.trees[-1][0] if self.trees else "config")


@dataclass
class WorkflowConfig:
    """The validated config with every default filled in."""

    models: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)  # sweep name -> its runs' swept settings
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # multiple-choice benchmarks by name
    serve_run: str | None = None  # the run `snakemake serve` serves
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # lookups derived from runs


def _defaults(props: dict[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(spec["default"]) for key, spec in props.items() if "default" in spec}


def _dotted(keys: tuple) -> str:
    return ".".join(str(k) for k in keys)


def load(raw: dict[str, Any], files: list[str | Path] = ()) -> WorkflowConfig:
    """Validate ``raw`` (the config as Snakemake loaded it) and return it with defaults filled in.

    Raises:
        UserError: one line per problem, each ``file:line: field: message``.
    """
    schema = load_schema()
    locate = YamlLocator(list(files))
    problems: list[str] = []

    def report(keys: tuple, message: str) -> None:
        problems.append(f"{locate.where(keys)}: {_dotted(keys) or 'config'}: {message}")

    sweeps: dict[str, dict[str, Any]] = {}
    if isinstance(raw.get("runs"), dict):
        settings = set(schema["$defs"]["run_settings"]["properties"])
        runs, sweeps = expand_sweeps(raw["runs"], settings, report)
        raw = {**raw, "runs": runs}

    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path]):
        keys = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            known = set(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - known):
                guess = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean `{guess[0]}`?" if guess else f"allowed: {', '.join(sorted(known))}"
                report(keys + (key,), f"unknown key `{key}` ({hint})")
        elif error.validator == "required":
            report(keys, error.message.replace("is a required property", "is required"))
        else:
            report(keys, error.message)
    if problems:
        raise UserError("\n".join(problems))

    defs = schema["$defs"]
    models = {}
    for name, entry in raw["models"].items():
        source = entry["source"]
        for key in sorted(set(entry) - SOURCE_KEYS[source] - {"source", "trust_remote_code"}):
            report(("models", name, key), f"`{key}` does not apply to source `{source}`")
        for key in sorted(SOURCE_REQUIRED[source] - set(entry)):
            report(("models", name), f"source `{source}` needs `{key}`")
        allowed = SOURCE_KEYS[source] | {"source", "trust_remote_code"}
        props = {k: v for k, v in defs["model"]["properties"].items() if k in allowed}
        models[name] = {**_defaults(props), **entry}
        if "cache_dir" in allowed and models[name]["cache_dir"] is None:
            models[name]["cache_dir"] = raw.get("model_cache_dir")

    datasets = {}
    for name, entry in raw["datasets"].items():
        datasets[name] = dataset = {**_defaults(defs["dataset"]["properties"]), **entry}
        if "dataset_info" in entry:
            if "name" not in entry:
                report(("datasets", name, "dataset_info"), "`dataset_info` needs `name`: which dataset in it")
                continue
            try:
                found = from_dataset_info(entry["dataset_info"], entry["name"])
            except UserError as problem:
                report(("datasets", name, "name"), str(problem))
                continue
            for key in ("columns", "tags"):
                dataset[key] = {**found[key], **entry.get(key, {})}
            dataset["path"], dataset["format"] = entry.get("path", found["path"]), entry.get("format", found["format"])
        for key in ("path", "format"):
            if key not in dataset:
                report(("datasets", name), f"`{key}` is required (or `dataset_info` and `name`)")
        if dataset.get("format") == "columns":
            for key in ("prompt", "response"):
                if not dataset[key]:
                    report(("datasets", name), f"format `columns` needs `{key}`: a template over the file's columns")

    run_props = defs["run_settings"]["properties"]
    base = {**_defaults(run_props), **copy.deepcopy(raw.get("run_defaults", {}))}
    runs = {}
    for name, entry in raw["runs"].items():
        run = {**base, **copy.deepcopy(entry)}
        for block in RUN_BLOCKS:
            block_defaults = _defaults(run_props[block]["properties"])
            run[block] = {**block_defaults, **base.get(block, {}), **entry.get(block, {})}
        for key, table in (("model", models), ("dataset", datasets)):
            if run[key] not in table:
                known = ", ".join(sorted(table))
                report(("runs", name, key), f"names undefined {key} `{run[key]}` (defined: {known})")
        benchmarks = raw.get("benchmarks", {})
        for benchmark in run["evaluation"]["benchmarks"]:
            if benchmark not in benchmarks:
                known = ", ".join(sorted(benchmarks)) or "none; add a top-level `benchmarks:` entry"
                report(("runs", name, "evaluation", "benchmarks"),
                       f"names undefined benchmark `{benchmark}` (defined: {known})")
        try:  # the train stage's own cross-field rules (qlora with ZeRO-3, LoRA+ with DeepSpeed ...)
            TrainSettings(**{f.name: run[f.name] for f in fields(TrainSettings)})
        except UserError as problem:
            report(("runs", name), str(problem))
        runs[name] = run
    if raw.get("serve_run") and raw["serve_run"] not in runs:
        report(("serve_run",), f"`{raw['serve_run']}` is not a run (runs: {', '.join(runs)})")
    if problems:
        raise UserError("\n".join(problems))
    return WorkflowConfig(models=models, datasets=datasets, runs=runs, sweeps=sweeps,
                          benchmarks=raw.get("benchmarks", {}), serve_run=raw.get("serve_run"))
