"""Shared fixtures: a tiny builtin model, and a helper that runs the real Snakefile in a scratch folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# The per-run jobs a change to one run's training replans, in the sorted order planned_jobs returns.
RUN_STAGES = ["evaluate", "merge", "predict", "train"]
BASELINE_STAGES = ["evaluate", "predict"]  # a baseline run (max_steps: 0) has no train or merge job
BASELINE_RUNS = {"identity-base"}  # the default config's baselines


# torch.compile's kernels (and the workflows' jobs', which inherit the variable) go to a cache of this test
# session's: a compile killed in another run (a 0-byte ``.so`` in the shared /tmp/torchinductor_<user>, which inductor
# then loads: "file too short") fails no test here. Set as this file is imported: collecting the tests imports torch,
# whose first look at the cache writes the shared folder's name into the variable.
OWN_COMPILE_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="inductor-")
if OWN_COMPILE_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = OWN_COMPILE_CACHE


@pytest.fixture(scope="session", autouse=True)
def own_compile_cache():
    yield OWN_COMPILE_CACHE
    if OWN_COMPILE_CACHE:
        shutil.rmtree(OWN_COMPILE_CACHE, ignore_errors=True)


def run_stages(run: str) -> list[str]:
    """The per-run jobs a change to ``run``'s training replans (the default config's runs)."""
    return BASELINE_STAGES if run in BASELINE_RUNS else RUN_STAGES

TINY_MODEL = {
    "source": "builtin", "architecture": "qwen2", "seed": 0, "vocab_size": 2048, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 256, "initializer_range": 0.2, "tie_word_embeddings": False, "trust_remote_code": False,
    "tokenizer_corpus": [str(REPO / "data" / "identity.jsonl"), str(REPO / "data" / "text_matching.json")],
}


def workflow_env() -> dict[str, str]:
    """Environment for Snakemake jobs: `python` must be this interpreter, with its packages."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def snakemake(workdir: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the project's Snakefile in ``workdir`` with the local profile."""
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--profile", str(REPO / "profiles" / "local"), "--cores", "2", *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=workflow_env(), cwd=workdir)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def train_command(built, run_dir, settings) -> list[str]:
    """scripts/train.py on ``built`` (a model's manifest and a dataset build's folder) into ``run_dir``."""
    from snaketune.layout import train_arguments

    manifest, data = built
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--model-manifest", str(manifest),
            *train_arguments(data, run_dir), "--settings", json.dumps(settings)]


def run_train(built, run_dir, settings) -> subprocess.CompletedProcess:
    """``train_command`` run to the end; it must succeed."""
    result = subprocess.run(train_command(built, run_dir, settings), capture_output=True, text=True,
                            env=workflow_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run plans, ``all`` left out."""
    jobs, rule = [], None
    for line in (result.stdout + result.stderr).splitlines():
        stripped = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            if rule and rule != "all":
                jobs.append((rule, ""))
            rule = line.split()[1].rstrip(":")
        elif stripped.startswith("wildcards:") and rule:
            jobs.append((rule, stripped.removeprefix("wildcards:").strip()))
            rule = None
    if rule and rule != "all":
        jobs.append((rule, ""))
    return sorted(jobs)


def scratch_workflow(tmp: Path, config: dict) -> Path:
    """A working folder with the bundled data and ``config.yaml``; returns the config path."""
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "data").exists():
        shutil.copytree(REPO / "data", tmp / "data")
    if (REPO / ".cache").is_dir() and not (tmp / ".cache").exists():  # the real model (make real-model), shared
        (tmp / ".cache").symlink_to(REPO / ".cache")
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory, default_config) -> Path:
    """The embedded default config run to the end once, shared by every test that inspects its results."""
    workdir = tmp_path_factory.mktemp("demo")
    config = scratch_workflow(workdir, default_config)
    # every job records what our code imported (tests/import_audit/sitecustomize.py), for tests/test_envs.py
    audit = {"SNAKETUNE_IMPORT_AUDIT": str(workdir / "import_audit"),
             "SNAKETUNE_IMPORT_AUDIT_CODE": str(REPO / "scripts"),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "import_audit"),
                                                         os.environ.get("PYTHONPATH")]))}
    (workdir / "import_audit").mkdir()
    saved = {key: os.environ.get(key) for key in audit}
    os.environ.update(audit)
    try:
        snakemake(workdir, "--configfile", str(config), check=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return workdir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny builtin model folder (tokenizer + random weights), built once per session."""
    from snaketune.download import fetch

    out = tmp_path_factory.mktemp("models") / "tiny"
    fetch(TINY_MODEL, out)
    return out


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> Path:
    """The tiny model with its output head tied to its input embedding (same tokenizer as ``tiny_model``)."""
    from snaketune.download import fetch

    out = tmp_path_factory.mktemp("models") / "tied"
    fetch({**TINY_MODEL, "tie_word_embeddings": True}, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def open_llama(path, n_ctx=512):  # n_ctx=0: the model's own context length
    """An exported GGUF in llama.cpp (llama-cpp-python), the independent runtime the export tests check against."""
    from llama_cpp import Llama

    # One thread: on a 2-core machine shared with other jobs, two threads wait on each other at every op
    # (measured 4x slower); logits_all keeps every position's logits in llm.scores.
    return Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, seed=0, n_threads=1, logits_all=True)


def llama_greedy(llm, ids, eos, new_tokens):
    """Greedy decoding in llama.cpp by argmax of its own logits: the answer ids, ending with eos if it came."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    answer = []
    while len(answer) < new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        answer.append(token)
        if token == eos:
            break
        llm.eval([token])
    return answer
