#!/usr/bin/env python
"""Collect every run's metrics, loss and answers into a leaderboard CSV, plots and an HTML report that compares
the runs, and write each sweep's runs.csv, best.json and plot.

Example:
    python scripts/report.py --runs '[{"run": "a", "model": "tiny", ..., "files": {"metrics": "...", "train_log":
        "...", "train_summary": "...", "loss_curve": "...", "predictions": "...", "train_timing": "..."},
        "exams": {}, "serve": {"model": "results/runs/a/merged"}}]' \\
        --leaderboard results/leaderboard.csv --html results/report.html
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=json.loads, required=True,
                        help="JSON list, one record per run: its columns, the files to read, exams, what to load")
    parser.add_argument("--leaderboard", required=True, help="leaderboard.csv to write")
    parser.add_argument("--html", required=True, help="report.html to write")
    parser.add_argument("--sweeps", type=json.loads, default={},
                        help="JSON: sweep name -> its runs, select_by/select_mode and the files to write")
    parser.add_argument("--plots", type=json.loads, default={},
                        help='JSON: {"loss": {dataset: png}, "metrics": {dataset: png}}, the plot files to write')
    return parser


def main(argv=None) -> int:
    from snaketune.cli import main_guard

    args = build_parser().parse_args(argv)

    def body():
        from snaketune.report import leaderboard_text, write_report

        write_report(args.runs, Path(args.leaderboard), Path(args.html), args.sweeps, args.plots)
        print(leaderboard_text(Path(args.leaderboard)))

    plot_files = [path for kind in args.plots.values() for path in kind.values()]
    return main_guard(body, outputs=[args.leaderboard, args.html, *plot_files])


if __name__ == "__main__":
    sys.exit(main())
