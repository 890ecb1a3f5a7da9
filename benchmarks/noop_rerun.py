#!/usr/bin/env python
"""How long Snakemake takes to find that nothing is stale in the finished default DAG (target: under 5 s).

    python benchmarks/noop_rerun.py            # in the repo root, with the virtualenv active

Runs the default pipeline once first (it finishes whatever is stale, or does nothing), then times `snakemake
--profile profiles/local` (a real invocation, not a dry run) a few times and prints one JSON line.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "snakemake", "--profile", "profiles/local"]


def main(repeats: int = 5) -> int:
    subprocess.run(COMMAND, cwd=REPO, check=True, capture_output=True)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(COMMAND, cwd=REPO, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0 or "Nothing to be done" not in result.stdout + result.stderr:
            print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
            print("error: the finished DAG still had work to do", file=sys.stderr)
            return 1
    print(json.dumps({"noop_rerun_seconds": {"median": round(statistics.median(seconds), 2),
                                             "max": round(max(seconds), 2), "runs": len(seconds)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
