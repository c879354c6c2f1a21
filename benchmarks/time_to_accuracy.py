"""Time to a good model: the `fast` recipe (or any) over several seeds, each in a fresh process.

    python benchmarks/time_to_accuracy.py                       # fast recipe, seeds 0-4
    python benchmarks/time_to_accuracy.py --recipe seed003 --seeds 0,1

Each seed runs `mnistlab train --recipe R --seed S` in its own child process, one at a time, and the
table splits the child's wall time into process start (interpreter, imports), data load (from the
cache), training (the epochs, what the recipe's target is about) and the rest (final test
evaluation, writing the run folder). Accuracy is on the 10,000 test images.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(recipe: str, seed: int, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "mnistlab", "train", "--recipe", recipe, "--seed", str(seed),
               "--out", str(out), "--quiet", "--no-report", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr}")
    metrics = json.loads((out / "metrics.json").read_text())
    started = json.loads((out / "config.json").read_text())
    return {"seed": seed, "accuracy": metrics["test_accuracy"], "train": metrics["train_seconds"],
            "load": metrics["load_seconds"], "wall": wall, "threads": started["versions"]["torch_threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("extra", nargs="*", help="more `mnistlab train` flags, after --")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            rows.append(run(args.recipe, seed, Path(tmp) / str(seed), args.extra))
            r = rows[-1]
            print(f"seed {r['seed']}: test accuracy {r['accuracy']:.4f}, training {r['train']:.2f} s, "
                  f"load {r['load']:.2f} s, process {r['wall']:.2f} s", file=sys.stderr)
    print(f"\n`python benchmarks/time_to_accuracy.py {' '.join(map(shlex.quote, sys.argv[1:]))}` "
          f"({os.cpu_count()} cores, {rows[0]['threads']} torch threads)\n")
    print("| seed | test accuracy | training s | data load s | other s (start, test, write) | process wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['accuracy'] * 100:.2f}% | {r['train']:.2f} | {r['load']:.2f} | "
              f"{r['wall'] - r['train'] - r['load']:.2f} | {r['wall']:.2f} |")
    for name, key, unit in (("accuracy", "accuracy", "%"), ("training", "train", " s")):
        values = [r[key] * (100 if unit == "%" else 1) for r in rows]
        print(f"\n{name}: mean {statistics.mean(values):.2f}{unit}, min {min(values):.2f}{unit}, "
              f"max {max(values):.2f}{unit}", end="")
    print()


if __name__ == "__main__":
    main()
