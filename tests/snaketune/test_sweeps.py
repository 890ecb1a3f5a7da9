"""Sweeps expand into ordinary runs with stable names; bad sweeps fail at validation; the best run is picked."""

import copy

import pytest

from snaketune.config import load
from snaketune.errors import UserError
from snaketune.sweeps import select_best


def with_sweep(default_config, sweep, **extra):
    config = copy.deepcopy(default_config)
    config["runs"]["identity-lora"].update(sweep=sweep, **extra)
    return config


def test_grid_expands_to_every_combination_with_readable_names(default_config):
    cfg = load(with_sweep(default_config, {"learning_rate": [0.01, 1e-05], "lora_rank": [8, 16]},
                          select_by="bleu-4", select_mode="min"))
    names = [n for n in cfg.runs if n.startswith("identity-lora")]
    assert names == ["identity-lora-learning_rate0.01-lora_rank8", "identity-lora-learning_rate0.01-lora_rank16",
                     "identity-lora-learning_rate1e-05-lora_rank8", "identity-lora-learning_rate1e-05-lora_rank16"]
    assert cfg.runs[names[3]].train.learning_rate == 1e-05 and cfg.runs[names[3]].train.lora_rank == 16
    assert cfg.runs[names[3]].train.num_train_epochs == 20  # everything else as the run had it
    assert "identity-base" in cfg.runs
    assert cfg.sweeps["identity-lora"]["select_by"] == "bleu-4" and cfg.sweeps["identity-lora"]["select_mode"] == "min"


def test_random_sweep_is_the_same_every_time_and_stays_in_range(default_config):
    sweep = {"mode": "random", "samples": 5, "seed": 3,
             "space": {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "lora_rank": [4, 8]}}
    first, again = load(with_sweep(default_config, sweep)), load(with_sweep(default_config, sweep))
    assert list(first.runs) == list(again.runs)
    points = list(first.sweeps["identity-lora"]["runs"].values())
    assert len(points) == 5 and all(1e-4 <= p["learning_rate"] <= 1e-2 and p["lora_rank"] in (4, 8) for p in points)


@pytest.mark.parametrize("sweep, message", [
    ({"learnig_rate": [0.1]}, "runs.identity-lora.sweep.learnig_rate: `learnig_rate` is not a run setting"),
    ({"lora_rank": []}, "runs.identity-lora.sweep.lora_rank: empty list of values"),
    ({"mode": "random", "samples": 2, "space": {"learning_rate": {"loguniform": [0.1, 0.01]}}},
     "runs.identity-lora.sweep.space.learning_rate: loguniform needs [lo, hi] with 0 < lo < hi"),
    ({"learning_rate": [0.01, 0.01]}, "runs.identity-lora.sweep: two runs expand to one name "
                                      "`identity-lora-learning_rate0.01`"),
    ({"lora_rank": ["sixteen"]}, "runs.identity-lora-lora_ranksixteen.lora_rank: 'sixteen' is not of type"),
])
def test_a_bad_sweep_fails_with_one_line_naming_run_and_key(tmp_path, default_config, sweep, message):
    import yaml

    config = with_sweep(default_config, sweep)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(UserError) as caught:
        load(config, [path])
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}:") and message in lines[0]


ROWS = [{"run": "c", "exact_match": 0.5, "bleu-4": 10.0}, {"run": "b", "exact_match": 0.9, "bleu-4": 30.0},
        {"run": "a", "exact_match": 0.9, "bleu-4": 20.0}, {"run": "d", "exact_match": 0.1, "bleu-4": float("nan")}]


def test_best_run_by_max_and_min_with_ties_broken_by_name():
    assert select_best(ROWS, "exact_match", "max")["run"] == "a"  # a and b tie at 0.9: the first name wins
    assert select_best(ROWS, "exact_match", "min")["run"] == "d"
    assert select_best(ROWS, "bleu-4", "max")["run"] == "b"
    assert select_best(ROWS, "bleu-4", "min")["run"] == "c"  # NaN never wins
    with pytest.raises(ValueError, match="no run has a value for `rouge-l`"):
        select_best(ROWS, "rouge-l", "max")
