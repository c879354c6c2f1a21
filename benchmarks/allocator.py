"""glibc's default memory thresholds against the ones mnistlab sets (devices.reuse_freed_memory).

    python benchmarks/allocator.py                                   # fast (1 epoch), seed003 (2 epochs)
    python benchmarks/allocator.py --runs fast:1,best:1 --rounds 2

Each run is `mnistlab train --recipe R --epochs E` in its own child process, one at a time,
alternating MNISTLAB_MALLOPT=0 (glibc's defaults) and mnistlab's setting for --rounds rounds. The
table gives the median training seconds of each epoch, the child's minor page faults and kernel
(system) CPU seconds, and the ratio measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"glibc defaults": "0", "mnistlab (reuse freed memory)": "1"}


def run(recipe: str, epochs: int, mallopt: str, out: Path) -> dict:
    command = [sys.executable, "-m", "mnistlab", "train", "--recipe", recipe, "--epochs", str(epochs),
               "--seed", "0", "--out", str(out), "--quiet", "--no-report"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MNISTLAB_MALLOPT": mallopt})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{recipe} failed:\n{done.stderr}")
    history = [float(line.split(",")[-1]) for line in (out / "history.csv").read_text().splitlines()[1:]]
    return {"epochs": history, "faults": after.ru_minflt - before.ru_minflt,
            "system": after.ru_stime - before.ru_stime,
            "accuracy": json.loads((out / "metrics.json").read_text())["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="fast:1,seed003:2", help="recipe:epochs, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    results = {(r, s): [] for r in runs for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for recipe, epochs in runs:
                for setting, value in SETTINGS.items():
                    r = run(recipe, epochs, value, Path(tmp) / f"{recipe}-{value}-{round_}")
                    results[(recipe, epochs), setting].append(r)
                    print(f"round {round_ + 1} {recipe} {setting}: epochs {r['epochs']} s, {r['faults']:,} faults, "
                          f"{r['system']:.2f} s system", file=sys.stderr)
    print(f"\n`python benchmarks/allocator.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} cores, "
          f"{args.rounds} rounds, medians)\n")
    print("| recipe | memory setting | epoch 1 s | later epochs s | page faults | system s | test accuracy |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for recipe, epochs in runs:
        first = {}
        for setting in SETTINGS:
            rs = results[(recipe, epochs), setting]
            first[setting] = statistics.median(r["epochs"][0] for r in rs)
            later = [e for r in rs for e in r["epochs"][1:]]
            print(f"| {recipe} ({epochs} epochs) | {setting} | {first[setting]:.2f} | "
                  f"{format(statistics.median(later), '.2f') if later else '-'} | "
                  f"{statistics.median(r['faults'] for r in rs):,.0f} | {statistics.median(r['system'] for r in rs):.2f} | "
                  f"{', '.join(format(r['accuracy'], '.4f') for r in rs)} |")
        print(f"| {recipe} | first epoch speed-up | {first['glibc defaults'] / first['mnistlab (reuse freed memory)']:.2f}x "
              "| | | | |")


if __name__ == "__main__":
    main()
