"""Workflow config: validation against the JSON schema, defaults, cross-references.

Every problem is reported at once, one line each, as ``file:line: field: what is wrong``, so a user fixes the
whole config in one pass instead of one error per run of Snakemake.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from snaketune.errors import UserError
from snaketune.formats import from_dataset_info
from snaketune.settings import (
    SOURCE_KEYS,
    SOURCE_REQUIRED,
    DatasetSettings,
    EvalSettings,
    ExamSettings,
    GenerationSettings,
    MergeSettings,
    TrainSettings,
)
from snaketune.sweeps import expand as expand_sweeps

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.yaml"


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
                # the last of repeated keys, as YAML keeps (repeats are refused by ``duplicates`` anyway)
                match = next(((k, v) for k, v in reversed(node.value) if k.value == str(key)), None)
                if match is None:
                    break
                line, node, depth = match[0].start_mark.line + 1, match[1], depth + 1
            if line is not None and (best is None or depth > best[0]):
                best = (depth, f"{path}:{line}")
            if depth == len(keys):
                break
        return best[1] if best else (self.trees[-1][0] if self.trees else "config")

    def duplicates(self) -> list[str]:
        """One line for every key given twice in one mapping: YAML would keep the last and drop the first (a whole
        run, when a run's name repeats) without a word."""
        found = []
        for path, root in self.trees:
            stack = [(root, ())]
            while stack:
                node, keys = stack.pop()
                children = []
                if isinstance(node, yaml.MappingNode):
                    first: dict[str, int] = {}
                    for key, value in node.value:
                        line = key.start_mark.line + 1
                        if key.value in first and key.value != "<<":
                            found.append((path, line, f"{_dotted(keys + (key.value,))}: given twice (also at line "
                                                      f"{first[key.value]}); YAML would keep this one and drop the "
                                                      "other: remove one"))
                        first.setdefault(key.value, line)
                        children.append((value, keys + (key.value,)))
                elif isinstance(node, yaml.SequenceNode):
                    children = [(item, keys + (index,)) for index, item in enumerate(node.value)]
                stack.extend(children)
        return [f"{path}:{line}: {message}" for path, line, message in sorted(found)]


@dataclass
class RunConfig:
    """One run: which model and dataset, and the settings of each stage after the dataset build."""

    name: str
    model: str
    dataset: str
    train: TrainSettings
    merge: MergeSettings
    generation: GenerationSettings
    evaluation: EvalSettings
    exam: ExamSettings
    from_run: str | None = None  # the run whose merged model this one starts from
    export: list[str] = field(default_factory=list)  # gguf types to write the run's model as (f16, q8_0 ...)
    baseline: str | None = None  # the run the report compares this one against (else found: see report.baselines)


@dataclass
class WorkflowConfig:
    """The validated config with every default filled in."""

    models: dict[str, dict[str, Any]]
    datasets: dict[str, DatasetSettings]
    runs: dict[str, RunConfig] = field(default_factory=dict)
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)  # sweep name -> its runs' swept settings
    exams: dict[str, dict[str, Any]] = field(default_factory=dict)  # multiple-choice exams by name
    serve_run: str | None = None  # the run `snakemake serve` serves
    gpu_memory_gib: float | None = None  # the machine's GPU memory per GPU: plans above it are refused
    disk_gib: float | None = None  # the disk the runs may fill: plans above it are refused


# Where each key of a run's settings goes: the train stage takes the top-level keys it has fields for, each
# block goes to its stage's dataclass. Defaults come from the dataclasses alone; test_settings checks that the
# schema documents the same keys and defaults.
RUN_KEYS = {"model", "dataset", "from_run", "export", "baseline"}
SWEEP_KEYS = {"sweep", "select_by", "select_mode"}  # consumed by sweeps.expand
BLOCKS = {"merge": MergeSettings, "generation": GenerationSettings, "evaluation": EvalSettings}
DERIVED = {("generation", "seed"): "seed"}  # block field -> the run setting it is copied from
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def build_run(name: str, run: dict[str, Any]) -> RunConfig:
    """The typed settings of one run; a key no dataclass takes is a bug here, never silently dropped."""
    top = {f.name for f in fields(TrainSettings)}
    unplaced = set(run) - top - RUN_KEYS - SWEEP_KEYS - set(BLOCKS)
    if unplaced:
        raise KeyError(f"run settings {sorted(unplaced)} have no stage dataclass")
    train = TrainSettings(**{key: run[key] for key in top if key in run})
    blocks = {}
    for block, cls in BLOCKS.items():
        values = dict(run.get(block) or {})
        for (owner, key), source in DERIVED.items():
            if owner == block:
                values[key] = getattr(train, source)
        blocks[block] = cls(**values)
    generation_batch = blocks["generation"].batch_size
    exam = ExamSettings(shots=blocks["evaluation"].shots, dtype=blocks["generation"].dtype,
                        batch_size=generation_batch if isinstance(generation_batch, int) else 16)
    export = list(dict.fromkeys("f16" if item == "gguf" else item.removeprefix("gguf:")
                                for item in run.get("export") or []))
    return RunConfig(name=name, model=run["model"], dataset=run["dataset"], train=train, exam=exam,
                     from_run=run.get("from_run"), export=export, baseline=run.get("baseline"), **blocks)


def start_chains(runs: dict[str, dict[str, Any]], report) -> None:
    """Check every ``from_run`` (an existing other run, no cycle, the same model) and fill in ``model`` from the
    run it starts from where it is left out."""
    for name, run in runs.items():
        chain, current = [name], run
        while current.get("from_run"):
            source = current["from_run"]
            if source not in runs:
                report(("runs", chain[-1], "from_run"), f"names undefined run `{source}` (runs: {', '.join(runs)})")
                break
            if source in chain:
                report(("runs", name, "from_run"), f"runs start from each other in a circle: "
                                                   f"{' -> '.join(chain + [source])}")
                break
            chain.append(source)
            current = runs[source]
        else:
            root_model = current.get("model")
            if run.get("model") is None:
                run["model"] = root_model
            elif root_model is not None and run["model"] != root_model:
                report(("runs", name, "model"), f"`{run['model']}` differs from `{root_model}`, the model of "
                                                f"`{chain[-1]}` it starts from (from_run); leave model out")
        if run.get("model") is None:
            report(("runs", name), "`model` is required (or `from_run`: the run to start from)")


def check_file(report, keys: tuple, path: str, kind: str = "file") -> None:
    """Report a data path that does not exist, or is a folder where a file is needed (or the other way)."""
    found = Path(path)
    if not found.exists():
        report(keys, f"{kind} `{path}` not found (paths are relative to {Path.cwd()})")
    elif kind == "file" and not found.is_file():
        report(keys, f"`{path}` is a folder; name the data file inside it")
    elif kind == "folder" and not found.is_dir():
        report(keys, f"`{path}` is a file; name the folder")


def numbers(value: Any, keys: tuple = ()) -> Iterator[tuple[tuple, float]]:
    """Every float in a loaded config, with its key path (YAML's .nan and .inf load as floats)."""
    if isinstance(value, float):
        yield keys, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, keys + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, keys + (index,))


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

    problems += locate.duplicates()
    for keys, value in numbers(raw):
        if not math.isfinite(value):
            report(keys, f"must be a finite number, not {value}")

    sweeps: dict[str, dict[str, Any]] = {}
    if isinstance(raw.get("runs"), dict):
        props = schema["$defs"]["run_settings"]["properties"]
        settings = set(props) | {f"{block}.{key}" for block in BLOCKS for key in props[block]["properties"]}
        runs, sweeps = expand_sweeps(raw["runs"], settings, report)
        raw = {**raw, "runs": runs}

    for section in ("models", "datasets", "runs", "exams"):  # full matches: the schema's `$` allows a final \n
        for name in raw.get(section) if isinstance(raw.get(section), dict) else ():
            if not NAME.fullmatch(str(name)):
                report((section, name), f"name {str(name)!r} may hold only letters, digits, '.', '_' and '-' and "
                                        "must start with a letter or digit")
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path]):
        keys = tuple(error.absolute_path)
        if error.validator == "pattern" and error.validator_value == schema["$defs"]["name"]["pattern"]:
            continue  # a name: reported above, with what a name may hold
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
        if source in ("local", "gguf") and "path" in entry:
            check_file(report, ("models", name, "path"), entry["path"], kind="folder" if source == "local" else "file")
        if source == "gguf" and not str(entry.get("path", ".gguf")).endswith(".gguf"):
            report(("models", name, "path"), f"`{entry['path']}` is not a .gguf file")
        for index, corpus in enumerate(entry.get("tokenizer_corpus") or []):
            check_file(report, ("models", name, "tokenizer_corpus", index), corpus)

    datasets = {}
    for name, entry in raw["datasets"].items():
        dataset = {key: value for key, value in entry.items() if key not in ("dataset_info", "name")}
        if "dataset_info" in entry:
            if "name" not in entry:
                report(("datasets", name, "dataset_info"), "`dataset_info` needs `name`: which dataset in it")
                continue
            if not Path(entry["dataset_info"]).is_file():
                check_file(report, ("datasets", name, "dataset_info"), entry["dataset_info"])
                continue
            try:
                found = from_dataset_info(entry["dataset_info"], entry["name"])
            except UserError as problem:
                report(("datasets", name, "name"), str(problem))
                continue
            for key in ("columns", "tags"):
                dataset[key] = {**found[key], **entry.get(key, {})}
            dataset.setdefault("path", found["path"])
            dataset.setdefault("format", found["format"])
            dataset.setdefault("ranking", found["ranking"])
        made = [key for key in ("mix", "replay") if key in dataset]
        clashes = [(key, other) for key in made[:1] for other in ("path", "format", "dataset_info", *made[1:])
                   if other in entry]
        for key, other in clashes:
            report(("datasets", name, other), f"`{other}` does not go with `{key}` (a {key} dataset's rows come "
                                              f"from {'its datasets' if key == 'mix' else 'its prompts'})")
        if clashes:
            continue
        for key in made:  # built from other datasets, or from the model's own answers: no file layout to name
            dataset.update(path=dataset["replay"] if key == "replay" else [], format="messages")
            if key == "mix":  # pairs, not a mapping: the order (the first one gives the test split) must survive JSON
                dataset["mix"] = [(part, weight) for part, weight in dataset["mix"].items()]
            if key == "replay":
                check_file(report, ("datasets", name, "replay"), dataset["replay"])
                if not str(dataset["replay"]).endswith((".txt", ".jsonl")):
                    report(("datasets", name, "replay"), "a prompt file is .txt (a prompt a line) or .jsonl "
                                                         '({"prompt": ...} a line)')
        if dataset.get("encoding", "auto") != "auto":
            try:
                codecs.lookup(dataset["encoding"])
            except LookupError:
                report(("datasets", name, "encoding"), f"`{dataset['encoding']}` is not an encoding Python knows "
                                                       "(utf-8, gb18030, big5, shift_jis, utf-16, ... or auto)")
        missing = [key for key in ("path", "format") if key not in dataset]
        for key in missing:
            report(("datasets", name), f"`{key}` is required (or `dataset_info` and `name`)")
        if missing:
            continue
        where = ("datasets", name, "dataset_info" if "path" not in entry and "dataset_info" in entry else "path")
        paths = [dataset["path"]] if isinstance(dataset["path"], str) else dataset["path"]
        for index, path in enumerate(paths if not made else []):
            check_file(report, where if isinstance(dataset["path"], str) else where + (index,), path)
        if dataset.get("format") == "columns":
            for key in ("prompt", "response"):
                if not dataset.get(key):
                    report(("datasets", name), f"format `columns` needs `{key}`: a template over the file's columns")
        try:
            datasets[name] = DatasetSettings(**dataset)
        except UserError as problem:
            report(("datasets", name, "ranking"), str(problem))

    for name, dataset in datasets.items():
        for part in dataset.mix_names:
            where = ("datasets", name, "mix", part)
            if part not in datasets:
                report(where, f"names undefined dataset `{part}` (defined: {', '.join(sorted(datasets))})")
            elif datasets[part].mix:
                report(where, f"`{part}` is a mix itself; list its datasets here instead")
            elif datasets[part].test_only:
                report(where, f"`{part}` has test_size: all (test rows only); score on it with evaluation.test_sets")
            elif datasets[part].ranking != datasets[dataset.mix_names[0]].ranking:
                report(where, "preference (ranking) and plain datasets cannot be mixed")
        parts = [datasets[part] for part in dataset.mix_names if part in datasets]
        if parts:  # a mix trains as its datasets do
            dataset.ranking, dataset.max_seq_length = parts[0].ranking, max(p.max_seq_length for p in parts)

    exams = raw.get("exams") or {}
    for name, entry in exams.items():
        check_file(report, ("exams", name, "path"), entry["path"], kind="folder")

    base = copy.deepcopy(raw.get("run_defaults") or {})
    merged_runs = {}
    for name, entry in raw["runs"].items():
        run = {**base, **copy.deepcopy(entry)}
        for block in BLOCKS:
            run[block] = {**base.get(block, {}), **entry.get(block, {})}
        merged_runs[name] = run
    start_chains(merged_runs, report)
    runs = {}
    for name, run in merged_runs.items():
        if run.get("model") is None:
            continue  # reported by start_chains
        if run.get("baseline") is not None and (run["baseline"] not in merged_runs or run["baseline"] == name):
            report(("runs", name, "baseline"), f"`{run['baseline']}` is not another run "
                                               f"(runs: {', '.join(merged_runs)})")
        if run.get("from_run") and run["generation"].get("predict_from") == "adapter":
            report(("runs", name, "generation", "predict_from"), "`adapter` cannot be used with from_run (the "
                                                                 "adapter sits on the other run's merged model)")
        if run.get("stage", "sft") != "sft" and run["dataset"] in datasets and not datasets[run["dataset"]].ranking:
            report(("runs", name, "stage"), f"stage {run['stage']} trains on preference pairs; dataset "
                                            f"`{run['dataset']}` has none (set its `ranking: true`, or "
                                            "`format: preference`)")
        for key, table in (("model", models), ("dataset", raw["datasets"])):
            if run[key] not in table:
                known = ", ".join(sorted(table))
                report(("runs", name, key), f"names undefined {key} `{run[key]}` (defined: {known})")
        if run["dataset"] in datasets and datasets[run["dataset"]].test_only:
            report(("runs", name, "dataset"), f"dataset `{run['dataset']}` has test_size: all (test rows only); "
                                              "train on another and score on it with evaluation.test_sets")
        for test_set in run["evaluation"].get("test_sets", []):
            if test_set not in datasets:
                report(("runs", name, "evaluation", "test_sets"), f"names undefined dataset `{test_set}` "
                                                                  f"(defined: {', '.join(sorted(datasets))})")
        for exam in run["evaluation"].get("exams", []):
            if exam not in exams:
                known = ", ".join(sorted(exams)) or "none; add a top-level `exams:` entry"
                report(("runs", name, "evaluation", "exams"), f"names undefined exam `{exam}` (defined: {known})")
        try:  # the stages' own cross-field rules (qlora with ZeRO-3, LoRA+ with DeepSpeed ...)
            runs[name] = build_run(name, run)
        except UserError as problem:
            report(("runs", name), str(problem))
    if raw.get("serve_run") and raw["serve_run"] not in runs:
        report(("serve_run",), f"`{raw['serve_run']}` is not a run (runs: {', '.join(raw['runs'])})")
    if problems:
        raise UserError("\n".join(problems))
    return WorkflowConfig(models=models, datasets=datasets, runs=runs, sweeps=sweeps, exams=exams,
                          serve_run=raw.get("serve_run"), gpu_memory_gib=raw.get("gpu_memory_gib"),
                          disk_gib=raw.get("disk_gib"))


DEFAULT_CONFIG = Path("config") / "config.yaml"  # the embedded default, as the Snakefile's `configfile:` names it


def merge_into(config: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Update ``config`` in place as Snakemake merges config files and ``--config``: a mapping merges key by key
    into a mapping, recursively; any other value (a list too) replaces what was there."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_into(config[key], value)
        else:
            config[key] = copy.deepcopy(value)
    return config


def read_file(path: str | Path) -> dict[str, Any]:
    """One config file (YAML, or JSON, which is YAML) as a mapping; a missing or malformed file is a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path}: a config file holds a mapping (`key: value` lines), not a {type(content).__name__}")
    return content


def load_files(files: list[str | Path] = (), overrides: dict[str, Any] | None = None) -> WorkflowConfig:
    """The config the workflow runs with ``--configfile files... --config overrides``: the files merged in order
    as Snakemake merges them, then the overrides, validated by ``load``. No files: the embedded default, as the
    Snakefile reads it. The workflow, ``plan.py``, ``chat.py`` and ``serve.py`` all load their config here, so the
    same files mean the same runs everywhere."""
    files = [Path(path) for path in files] or [DEFAULT_CONFIG]
    raw: dict[str, Any] = {}
    for path in files:
        merge_into(raw, read_file(path))
    merge_into(raw, overrides or {})
    return load(raw, files)
