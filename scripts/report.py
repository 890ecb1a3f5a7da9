#!/usr/bin/env python
"""Collect every run's metrics and loss curve into results/leaderboard.csv and results/report.html.

Example:
    python scripts/report.py --runs '[{"run": "a", ...}]' --metrics results/runs/a/metrics.json \\
        --logs results/runs/a/train_log.csv --curves results/runs/a/loss.png \\
        --leaderboard results/leaderboard.csv --html results/report.html
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=json.loads, required=True, help="JSON list of run descriptions")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json per run, in --runs order")
    parser.add_argument("--logs", nargs="+", required=True, help="train_log.csv per run, in --runs order")
    parser.add_argument("--curves", nargs="+", required=True, help="loss.png per run, in --runs order")
    parser.add_argument("--predictions", nargs="*", default=None, help="predictions.csv per run, in --runs order")
    parser.add_argument("--train-times", nargs="*", default=None,
                        help="Snakemake benchmark .tsv of each run's train job, in --runs order")
    parser.add_argument("--benchmarks", nargs="*", default=[],
                        help="results/runs/{run}/benchmarks/{name}.json files (multiple-choice scores)")
    parser.add_argument("--leaderboard", required=True, help="leaderboard.csv to write")
    parser.add_argument("--html", required=True, help="report.html to write")
    parser.add_argument("--sweeps", type=json.loads, default={}, help="JSON: sweep name -> its runs and select_by")
    parser.add_argument("--sweep-dir", default="results/sweeps", help="where each sweep's runs.csv/best.json go")
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.errors import UserError
        from snaketune.report import write_report

        if not len(args.runs) == len(args.metrics) == len(args.logs) == len(args.curves):
            raise UserError("--runs, --metrics, --logs and --curves must name the same number of runs")
        rows = write_report(args.runs, [Path(p) for p in args.metrics], [Path(p) for p in args.logs],
                            [Path(p) for p in args.curves], Path(args.leaderboard), Path(args.html),
                            args.sweeps, Path(args.sweep_dir),
                            predictions=[Path(p) for p in args.predictions] if args.predictions else None,
                            train_times=[Path(p) for p in args.train_times] if args.train_times else None,
                            benchmarks=[Path(p) for p in args.benchmarks])
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))

    return main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
