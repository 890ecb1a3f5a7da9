"""The settings dataclasses (snaketune/settings.py) and the config's JSON schema describe the same keys: every field
is a schema property of its block with the same type, allowed values and default, and every property of a block is
a field. The exceptions are listed here, each with its reason."""

import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from conftest import REPO
from snaketune.config import BLOCKS, DERIVED, RUN_KEYS, SWEEP_KEYS, load_schema
from snaketune.settings import (
    DEEPSPEED_CONFIGS,
    DatasetSettings,
    EvalSettings,
    ExamSettings,
    GenerationSettings,
    MergeSettings,
    ModelSettings,
    ReplaySettings,
    ServiceSettings,
    TrainSettings,
    choice_problems,
    literal_values,
)
from snaketune.templates import TEMPLATES

SCHEMA = load_schema()
DEFS = SCHEMA["$defs"]
RUN = DEFS["run_settings"]["properties"]
ALL_SETTINGS = (ModelSettings, DatasetSettings, ReplaySettings, TrainSettings, MergeSettings, GenerationSettings,
                EvalSettings, ExamSettings, ServiceSettings)


def train_properties() -> dict:
    return {key: spec for key, spec in RUN.items() if key not in RUN_KEYS | SWEEP_KEYS | set(BLOCKS)}


# Each dataclass -> (the schema properties it mirrors, field -> property where the names differ; None: no property)
def block(cls) -> tuple[dict, dict[str, str | None]]:
    if cls is ModelSettings:
        return DEFS["model"]["properties"], {}
    if cls is DatasetSettings:  # dataset_info and name are resolved by the loader into path, format, columns, tags
        return {k: v for k, v in DEFS["dataset"]["properties"].items() if k not in ("dataset_info", "name")}, {}
    if cls is TrainSettings:
        return train_properties(), {}
    if cls in BLOCKS.values():
        name = next(key for key, value in BLOCKS.items() if value is cls)
        derived = {key: None for owner, key in DERIVED if owner == name}  # copied from a run setting (seed)
        return RUN[name]["properties"], derived
    if cls is ExamSettings:  # made by config.build_run from the run's evaluation and generation blocks
        return {"shots": RUN["evaluation"]["properties"]["shots"], "dtype": RUN["generation"]["properties"]["dtype"]}, \
            {"batch_size": None}  # generation.batch_size, with auto made 16: an int here
    if cls is ReplaySettings:  # made by workflow.replay_settings from the settings of a dataset that sets `replay`
        dataset = DEFS["dataset"]["properties"]
        given = {key: value for key, value in dataset["replay"].items() if key != "default"} | {"type": "string"}
        return ({"prompts": given, "system": dataset["system"], "template": dataset["template"],
                 "max_new_tokens": dataset["replay_max_new_tokens"]},
                {"batch_size": None, "dtype": None})  # the replay CLI's own; the workflow leaves them at auto
    if cls is ServiceSettings:  # `snakemake serve`: serve_host from the config, the rest are scripts/serve.py flags
        return {"host": SCHEMA["properties"]["serve_host"]}, {name: None for name in (
            "api_key", "max_body_bytes", "max_tokens_limit", "default_max_tokens", "max_context", "allowed_hosts",
            "allowed_origins", "retry_after_seconds")}
    raise AssertionError(cls)


# Fields whose schema type is deliberately not their Python type, each with its own check below.
TYPE_EXCEPTIONS = {
    (DatasetSettings, "mix"),  # the config's mapping {name: weight}; the loader keeps it as ordered (name, weight)
    (DatasetSettings, "template"), (ReplaySettings, "template"),  # the schema's enum is templates.TEMPLATES
    (TrainSettings, "deepspeed"),  # the schema's enum is the JSON files in config/deepspeed/
}


def json_kinds(spec: dict) -> set:
    """What a schema property allows: ("type", name), ("value", literal) and ("array", item kinds)."""
    kinds = set()
    for sub in spec.get("oneOf", []):
        kinds |= json_kinds(sub)
    for value in spec.get("enum", []) + ([spec["const"]] if "const" in spec else []):
        kinds.add(("type", "null") if value is None else ("value", value))
    names = spec.get("type", [])
    for name in [names] if isinstance(names, str) else names:
        if name == "array":
            kinds.add(("array", frozenset(json_kinds(spec.get("items", {})))))
        else:
            kinds.add(("type", name))
    return kinds


PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", type(None): "null"}


def python_kinds(annotation: Any) -> set:
    """The same for a field's type."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {("type", "null") if value is None else ("value", value) for value in get_args(annotation)}
    if origin in (typing.Union, types.UnionType):
        return set().union(*(python_kinds(part) for part in get_args(annotation)))
    if origin in (list, tuple):
        return {("array", frozenset(python_kinds(get_args(annotation)[0])))}
    return {("type", PY_TYPES[origin or annotation])}


def cases():
    for cls in ALL_SETTINGS:
        properties, renamed = block(cls)
        for spec in fields(cls):
            yield pytest.param(cls, spec, properties, renamed, id=f"{cls.__name__}.{spec.name}")


@pytest.mark.parametrize("cls, spec, properties, renamed", list(cases()))
def test_every_field_is_in_the_schema_with_its_type_allowed_values_and_default(cls, spec, properties, renamed):
    assert spec.metadata.get("help"), f"{cls.__name__}.{spec.name} has no help text"
    if spec.name in renamed and renamed[spec.name] is None:
        assert spec.name not in properties
        return  # not a config key (listed in `block` with its reason)
    assert spec.name in properties, f"{cls.__name__}.{spec.name} is not in the schema"
    prop = properties[spec.name]
    annotation = typing.get_type_hints(cls)[spec.name]
    if (cls, spec.name) not in TYPE_EXCEPTIONS:
        ours = python_kinds(annotation)
        if spec.metadata.get("required_for"):  # None: left out (a source that needs it says so)
            ours.discard(("type", "null"))
        assert ours == json_kinds(prop), f"{cls.__name__}.{spec.name}: {ours} != schema {json_kinds(prop)}"
    if spec.default is not MISSING and not spec.metadata.get("required_for"):
        assert prop.get("default") == spec.default, f"{cls.__name__}.{spec.name}: default differs"
    elif spec.default_factory is not MISSING:
        assert prop.get("default") == spec.default_factory(), f"{cls.__name__}.{spec.name}: default differs"
    else:
        assert "default" not in prop, f"{cls.__name__}.{spec.name}: required here, defaulted in the schema"


@pytest.mark.parametrize("cls", ALL_SETTINGS, ids=lambda cls: cls.__name__)
def test_every_schema_property_of_a_block_is_a_field(cls):
    properties, _ = block(cls)
    assert set(properties) - {spec.name for spec in fields(cls)} == set()


def test_the_listed_type_exceptions_hold_their_own_way():
    dataset = DEFS["dataset"]["properties"]
    assert set(dataset["template"]["enum"]) == {"auto", *TEMPLATES}
    assert RUN["deepspeed"]["enum"][0] is None
    assert set(RUN["deepspeed"]["enum"][1:]) == {path.stem for path in DEEPSPEED_CONFIGS.glob("*.json")}
    assert dataset["mix"]["type"] == ["object", "null"] and dataset["mix"]["additionalProperties"]["type"] == "number"
    assert DEEPSPEED_CONFIGS == REPO / "config" / "deepspeed"


def test_top_level_keys_are_every_run_key_or_a_blocks_own():
    """A run key the schema accepts but no dataclass (or RunConfig) takes would be silently dropped."""
    placed = {spec.name for spec in fields(TrainSettings)} | RUN_KEYS | SWEEP_KEYS | set(BLOCKS)
    assert set(RUN) == placed


def test_literal_fields_are_checked_when_train_settings_are_made():
    assert literal_values(typing.get_type_hints(TrainSettings)["gradient_checkpointing"]) == ("auto", True, False)
    settings = TrainSettings()
    settings.packing, settings.method = 1, "adapter"  # 1 == True, but is not an allowed value
    assert choice_problems(settings, ("packing", "method")) == [
        "packing `1` is not one of auto, tokens, rows, False", "method `adapter` is not one of lora, qlora, full, none"]


def test_settings_module_imports_no_stage():
    source = Path(__file__).resolve().parents[2] / "scripts" / "snaketune" / "settings.py"
    imported = [line for line in source.read_text().splitlines() if line.startswith("from snaketune")]
    assert imported == ["from snaketune.errors import UserError"]
