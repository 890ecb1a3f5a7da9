"""Where every file of the workflow lives: the one place a path is spelled.

Rules take their output patterns from ``PATTERNS`` and their inputs from a ``Layout``; the report, ``best.json``,
chat and serve ask the same ``Layout``. Runs that differ only after training share the upstream jobs: a run's
adapter is the one of the first run with the same model, data and train settings (its *train owner*), its merged
model the one of the first run that also merges alike, its predictions those of the first run that also generates
alike. ``Layout.run_file`` applies that sharing, so no caller ever names a folder that is not built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from snaketune.config import WorkflowConfig
from snaketune.settings import job_params

# Every file pattern, by the name the code uses for it. {run}, {model}, {dataset}, {exam}, {sweep} are wildcards.
PATTERNS = {
    # download
    "model_dir": "results/models/{model}",
    "model_manifest": "results/models/{model}/manifest.json",
    # dataset
    "dataset_dir": "results/datasets/{dataset}/{model}",
    "train_split": "results/datasets/{dataset}/{model}/train.parquet",
    "eval_split": "results/datasets/{dataset}/{model}/eval.parquet",
    "test_split": "results/datasets/{dataset}/{model}/test.parquet",
    "dataset_stats": "results/datasets/{dataset}/{model}/stats.json",
    "dataset_lengths": "results/datasets/{dataset}/{model}/lengths.png",
    "replay_answers": "results/datasets/{dataset}/{model}/replay.jsonl",  # a replay dataset's rows, generated
    # train (checkpoints and tensorboard are the train job's own resumable state, not outputs)
    "adapter": "results/runs/{run}/adapter",
    "checkpoints": "results/runs/{run}/checkpoints",
    "tensorboard": "results/runs/{run}/tensorboard",
    "train_log": "results/runs/{run}/train_log.csv",
    "loss_curve": "results/runs/{run}/loss.png",
    "train_summary": "results/runs/{run}/train_summary.json",
    # merge, predict, evaluate, exam
    "merged": "results/runs/{run}/merged",
    "gguf": "results/runs/{run}/gguf/{gguf_type}/model.gguf",  # export
    "modelfile": "results/runs/{run}/gguf/{gguf_type}/Modelfile",
    "predictions": "results/runs/{run}/predictions.csv",
    "partial_predictions": "results/runs/{run}/predictions.partial.csv",
    "metrics": "results/runs/{run}/metrics.json",
    "exam_result": "results/runs/{run}/exams/{exam}.json",
    "test_set_predictions": "results/runs/{run}/test_sets/{test_set}/predictions.csv",
    "test_set_partial_predictions": "results/runs/{run}/test_sets/{test_set}/predictions.partial.csv",
    "test_set_metrics": "results/runs/{run}/test_sets/{test_set}/metrics.json",
    # report
    "leaderboard": "results/leaderboard.csv",
    "report_html": "results/report.html",
    "sweep_runs": "results/sweeps/{sweep}/runs.csv",
    "sweep_best": "results/sweeps/{sweep}/best.json",
    "sweep_plot": "results/sweeps/{sweep}/points.png",
    "loss_plot": "results/plots/loss-{dataset}.png",  # train and eval loss of a dataset's runs, shared axes
    "metrics_plot": "results/plots/metrics-{dataset}.png",  # a dataset's runs' metrics as bars
}

# The stage whose job writes each per-run file: the sharing of that stage's jobs applies to it.
STAGE_OF = {
    "adapter": "train", "checkpoints": "train", "tensorboard": "train", "train_log": "train", "loss_curve": "train",
    "train_summary": "train", "merged": "merge",
    "gguf": "merge", "modelfile": "merge", "predictions": "predict", "partial_predictions": "predict",
    "metrics": "evaluate", "exam_result": "exam", "test_set_predictions": "predict",
    "test_set_partial_predictions": "predict", "test_set_metrics": "evaluate",
}

# Logs and Snakemake's timing files, by stage.
LOGS = {
    "download": "logs/download/{model}",
    "dataset": "logs/dataset/{dataset}/{model}",
    "train": "logs/train/{run}",
    "merge": "logs/merge/{run}",
    "predict": "logs/predict/{run}",
    "evaluate": "logs/evaluate/{run}",
    "exam": "logs/exam/{run}/{exam}",
    "export": "logs/export/{run}/{gguf_type}",
    "replay": "logs/replay/{dataset}/{model}",
    "predict_test_set": "logs/predict/{run}/{test_set}",
    "evaluate_test_set": "logs/evaluate/{run}/{test_set}",
    "report": "logs/report/report",
    "best": "logs/report/best",
    "serve": "logs/serve/serve",
    "plan": "logs/plan/plan",
}


# The dataset build's outputs (scripts/dataset.py's options) -> their patterns.
DATASET_OUTPUTS = {"train": "train_split", "eval": "eval_split", "test": "test_split", "stats": "dataset_stats",
                   "lengths": "dataset_lengths"}


def dataset_outputs(folder: str | Path) -> dict[str, Path]:
    """The dataset build's files laid out in ``folder`` as the workflow lays them out (for tests and benchmarks)."""
    base = PATTERNS["dataset_dir"]
    return {out: Path(folder) / Path(PATTERNS[key]).relative_to(base) for out, key in DATASET_OUTPUTS.items()}


def run_outputs(folder: str | Path) -> dict[str, Path]:
    """A run's files laid out in ``folder`` as the workflow lays out ``results/runs/{run}``, by pattern name."""
    base = "results/runs/{run}"
    return {name: Path(folder) / Path(path).relative_to(base) for name, path in PATTERNS.items()
            if path.startswith(base + "/") and path.count("{") == 1}  # {run} its only wildcard


TRAIN_OPTIONS = {"--train": "train", "--eval": "eval", "--stats": "stats"}  # scripts/train.py <- dataset outputs
TRAIN_RUN_OPTIONS = {"--adapter": "adapter", "--train-log": "train_log", "--summary": "train_summary",
                     "--curve": "loss_curve", "--checkpoints": "checkpoints", "--tensorboard": "tensorboard"}


def train_arguments(dataset_folder: str | Path, run_folder: str | Path) -> list[str]:
    """scripts/train.py's file options for a dataset built in ``dataset_folder`` and a run in ``run_folder``
    (for tests and benchmarks; the workflow's train rule passes the same options from its inputs/outputs)."""
    data, run = dataset_outputs(dataset_folder), run_outputs(run_folder)
    return ([item for option, key in TRAIN_OPTIONS.items() for item in (option, str(data[key]))]
            + [item for option, key in TRAIN_RUN_OPTIONS.items() for item in (option, str(run[key]))])


def pattern(name: str) -> str:
    """The path pattern of a file, wildcards left in (for rule outputs)."""
    return PATTERNS[name]


def log(stage: str) -> str:
    """The log file pattern of a stage's jobs."""
    return LOGS[stage] + ".log"


def timing(stage: str) -> str:
    """The Snakemake benchmark (timing) file pattern of a stage's jobs."""
    return LOGS[stage] + ".benchmark.tsv"


def _json(settings: Any) -> str:
    import json

    return json.dumps(asdict(settings), sort_keys=True, ensure_ascii=False)


class Layout:
    """Every path of one config's runs, with the sharing of upstream jobs applied."""

    def __init__(self, cfg: WorkflowConfig):
        self.cfg = cfg
        self._owners: dict[str, dict[str, str]] = {}

    # -- which run's job builds a stage's files ------------------------------------------------------------
    def _identity(self, stage: str) -> Callable[[str], tuple]:
        runs = self.cfg.runs

        def training(run: str) -> tuple:
            return runs[run].model, runs[run].dataset, runs[run].from_run, _json(runs[run].train)

        def merging(run: str) -> tuple:
            return training(run) + (_json(runs[run].merge),)

        def predicting(run: str) -> tuple:
            return merging(run) + (_json(runs[run].generation),)

        return {"train": training, "merge": merging, "predict": predicting}[stage]

    def owner(self, stage: str, run: str) -> str:
        """The run whose ``stage`` job this run uses: the first run, in config order, that needs the same job."""
        if stage not in ("train", "merge", "predict"):
            return run
        if stage not in self._owners:
            identity, firsts = self._identity(stage), {}
            for name in self.cfg.runs:
                firsts.setdefault(identity(name), name)
            self._owners[stage] = {name: firsts[identity(name)] for name in self.cfg.runs}
        return self._owners[stage][run]

    # -- paths ---------------------------------------------------------------------------------------------
    def run_file(self, name: str, run: str, **wildcards: str) -> str:
        """A per-run file of ``run``, in the folder of the run whose job builds it."""
        return PATTERNS[name].format(run=self.owner(STAGE_OF[name], run), **wildcards)

    def model_file(self, name: str, model: str) -> str:
        return PATTERNS[name].format(model=model)

    def dataset_file(self, name: str, run: str) -> str:
        """A file of the dataset build ``run`` trains on (its dataset, tokenized for its model)."""
        spec = self.cfg.runs[run]
        return PATTERNS[name].format(dataset=spec.dataset, model=spec.model)

    def trains(self, run: str) -> bool:
        """Whether ``run`` has train and merge jobs: a baseline (``max_steps: 0``) has neither, and predict and exam
        read the model it starts from."""
        return self.cfg.runs[run].train.trains

    def dataset_inputs(self, dataset: str, model: str) -> dict[str, Any]:
        """What the dataset build of ``dataset`` for ``model`` reads besides the model's manifest: its data files,
        a replay dataset's generated answers, or a mix's datasets built for the same model (every one's train and
        eval split and stats; the first one's test split)."""
        settings = self.cfg.datasets[dataset]
        if settings.replay:
            return {"replay": PATTERNS["replay_answers"].format(dataset=dataset, model=model)}
        if settings.mix:
            built = {name: {key: PATTERNS[key].format(dataset=name, model=model)
                            for key in ("train_split", "eval_split", "test_split", "dataset_stats")}
                     for name in settings.mix_names}
            return {"mix_train": [files["train_split"] for files in built.values()],
                    "mix_eval": [files["eval_split"] for files in built.values()],
                    "mix_stats": [files["dataset_stats"] for files in built.values()],
                    "mix_test": built[settings.mix_names[0]]["test_split"]}
        return {"data": [str(path) for path in settings.paths]}

    def test_set_split(self, test_set: str, run: str) -> str:
        """The test split of the dataset ``test_set``, built for the model of ``run``."""
        return PATTERNS["test_split"].format(dataset=test_set, model=self.cfg.runs[run].model)

    def test_set_metrics(self, run: str) -> dict[str, str]:
        return {name: self.run_file("test_set_metrics", run, test_set=name)
                for name in self.cfg.runs[run].evaluation.test_sets}

    def start_model(self, run: str) -> dict[str, str]:
        """What train and merge start from besides the base model's manifest: with ``from_run``, that run's merged
        model (``start``); otherwise nothing."""
        source = self.cfg.runs[run].from_run
        return {"start": self.run_file("merged", source)} if source else {}

    def run_model(self, run: str) -> dict[str, str]:
        """What predict, exam, chat and serve load for ``run``: its merged model, or (predict_from: adapter) the
        base model's manifest and the adapter; a baseline's the model it starts from (the base's manifest, or with
        ``from_run`` that run's merged model)."""
        if not self.trains(run):
            start = self.start_model(run)
            return {"model": start["start"]} if start else {
                "manifest": self.model_file("model_manifest", self.cfg.runs[run].model)}
        if self.cfg.runs[run].generation.predict_from == "adapter":
            return {"manifest": self.model_file("model_manifest", self.cfg.runs[run].model),
                    "adapter": self.run_file("adapter", run)}
        return {"model": self.run_file("merged", run)}

    def export_model(self, run: str) -> dict[str, str]:
        """What the export of ``run`` reads: its merged model (a baseline's: the model it starts from), and the GGUF
        file the base came from, when it came from one (its pre-tokenizer name goes into the export)."""
        spec = self.cfg.runs[run]
        model = self.run_model(run) if not self.trains(run) else {"model": self.run_file("merged", run)}
        entry = self.cfg.models[spec.model]
        return {**model, **({"source_gguf": entry["path"]} if entry["source"] == "gguf" else {})}

    def export_files(self, run: str) -> list[str]:
        return [self.run_file(name, run, gguf_type=kind) for kind in self.cfg.runs[run].export
                for name in ("gguf", "modelfile")]

    def exam_results(self, run: str) -> dict[str, str]:
        return {exam: self.run_file("exam_result", run, exam=exam) for exam in self.cfg.runs[run].evaluation.exams}

    def sweep_files(self, name: str) -> dict[str, str]:
        return {"runs_csv": PATTERNS["sweep_runs"].format(sweep=name),
                "best_json": PATTERNS["sweep_best"].format(sweep=name),
                "plot": PATTERNS["sweep_plot"].format(sweep=name)}

    def scored_on(self, run: str) -> str:
        """The dataset whose test rows ``run`` answers: its own, or for a mix the first dataset's (the mix's test
        split is that one's), followed through mixes of mixes."""
        dataset = self.cfg.runs[run].dataset
        while self.cfg.datasets[dataset].mix:
            dataset = self.cfg.datasets[dataset].mix_names[0]
        return dataset

    def report_plots(self) -> dict[str, dict[str, str]]:
        """The report's plot files by kind and by the dataset whose test rows the runs answer (``scored_on``):
        loss curves where one of those runs trains, metric bars for each."""
        runs = self.cfg.runs
        trained = dict.fromkeys(self.scored_on(run) for run in runs if self.trains(run))
        scored = dict.fromkeys(self.scored_on(run) for run in runs)
        return {"loss": {name: PATTERNS["loss_plot"].format(dataset=name) for name in trained},
                "metrics": {name: PATTERNS["metrics_plot"].format(dataset=name) for name in scored}}

    def report_record(self, run: str) -> dict[str, Any]:
        """What the report reads of one run: its settings columns and the path of each file it shows."""
        spec = self.cfg.runs[run]
        trained = ("train_log", "train_summary", "loss_curve") if self.trains(run) else ()
        settings = {"model": spec.model, "dataset": spec.dataset, "from_run": spec.from_run or "",
                    **{key: value for key, value in job_params(spec.train).items() if self.trains(run) or key in (
                        "max_steps", "method")},
                    **{f"generation.{key}": value for key, value in job_params(spec.generation).items()}}
        settings["method"] = settings["method"] if self.trains(run) else "none"
        return {
            "run": run, "model": spec.model, "dataset": spec.dataset, "scored_on": self.scored_on(run),
            "baseline": spec.baseline or "",
            "trains": self.trains(run), "settings": settings,
            "method": spec.train.method if self.trains(run) else "none",
            "stage": spec.train.stage, "from_run": spec.from_run or "",
            "learning_rate": spec.train.learning_rate, "num_train_epochs": spec.train.num_train_epochs,
            "max_steps": spec.train.max_steps,
            "files": {
                "metrics": self.run_file("metrics", run),
                **{name: self.run_file(name, run) for name in trained},
                "predictions": self.run_file("predictions", run),
                **({"train_timing": timing("train").format(run=self.owner("train", run))} if trained else {}),
            },
            "exams": self.exam_results(run),
            "test_sets": self.test_set_metrics(run),
            "test_set_answers": {name: self.run_file("test_set_predictions", run, test_set=name)
                                 for name in spec.evaluation.test_sets},
            "serve": self.run_model(run),
        }

    def report_inputs(self) -> list[str]:
        """Every file the report reads, for the rule's input."""
        files = []
        for run in self.cfg.runs:
            record = self.report_record(run)
            files += [*record["files"].values(), *record["exams"].values(), *record["test_sets"].values(),
                      *record["test_set_answers"].values(), *record["serve"].values()]
        return list(dict.fromkeys(files))

    def built_files(self, run: str) -> list[str]:
        """Every file ``run`` is made of, from its model's manifest and dataset build to its exams.

        All of them are targets of the default rule, so a file that is gone is rebuilt with everything after it.
        Snakemake treats a missing file between two present ones as a deleted temporary and plans nothing: an
        interrupted ``--forcerun train`` leaves no adapter beside the old merged model and metrics, and a plain
        rerun would keep those."""
        spec = self.cfg.runs[run]
        builds = [(spec.dataset, spec.model), *((name, spec.model) for name in spec.evaluation.test_sets)]
        files = [self.model_file("model_manifest", spec.model)]
        for dataset, model in builds:
            files += [PATTERNS[key].format(dataset=dataset, model=model) for key in DATASET_OUTPUTS.values()]
            inputs = self.dataset_inputs(dataset, model)
            inputs.pop("data", None)  # the user's own files: sources, not built
            files += [path for value in inputs.values() for path in ([value] if isinstance(value, str) else value)]
        if self.trains(run):
            files += [self.run_file(name, run) for name in ("adapter", "train_log", "train_summary", "loss_curve")]
        record = self.report_record(run)
        files += [*record["files"].values(), *record["exams"].values(), *record["test_sets"].values(),
                  *record["test_set_answers"].values(), *record["serve"].values(), *self.start_model(run).values()]
        if spec.export:  # the model an export reads (a run predicting from its adapter merges only for it)
            files += [path for key, path in self.export_model(run).items() if key != "source_gguf"]
        return [path for path in files if not path.endswith(".benchmark.tsv")]

    def final_outputs(self) -> list[str]:
        """What the default target builds: the leaderboard, the report page, every sweep's files, every export
        and every file the runs are made of (``built_files``)."""
        sweeps = [path for name in self.cfg.sweeps for path in self.sweep_files(name).values()]
        exports = [path for run in self.cfg.runs for path in self.export_files(run)]
        built = [path for run in self.cfg.runs for path in self.built_files(run)]
        plots = [path for kind in self.report_plots().values() for path in kind.values()]
        return list(dict.fromkeys([PATTERNS["leaderboard"], PATTERNS["report_html"], *plots, *sweeps, *exports,
                                   *built]))
