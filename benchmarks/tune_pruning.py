"""What hyperband pruning saves: the seed001 search (the Keras Tuner tutorial's) with and without it.

    python benchmarks/tune_pruning.py --threads 1            # 10 trials of 2 epochs, ~1 h on 2 cores
    python benchmarks/tune_pruning.py --trials 4 --limit-train 5000   # a quick look

Both searches draw the same hyperparameters (the random sampler, the same seed): the only
difference is that the pruned search stops a trial after its first epoch when its validation
accuracy is not in the top third of the trials so far at that epoch (Optuna's HyperbandPruner; with
2 epochs it has one bracket, i.e. successive halving with rungs at epochs 1 and 3). The data set is
MNIST: the tutorial's Fashion-MNIST is not available offline here, and MNIST has the same size
(60,000 28x28 training images, 10% held out for validation), so it costs the same time per epoch.
Wall time is the whole search (data loading, every trial, the result files), one process, run
one after the other so they never share the CPU. CPU time (this process's, user + system) is
printed beside it: on a machine shared with other jobs the wall time of two searches run an hour
apart can differ by 2x for the same work, the CPU time much less.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mnistlab import tune


def run(pruner: str, args, out: Path) -> dict:
    settings = tune.make_settings("seed001", {"dataset": args.dataset, "epochs": args.epochs, "seed": args.seed,
                                              "limit_train": args.limit_train},
                                  trials=args.trials, sampler=args.sampler, pruner=pruner)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = tune.search(settings, out / pruner, data_dir=args.data_dir, threads=args.threads, progress=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    trials = result.study.get_trials()
    return {"pruner": pruner, "wall_s": wall, "cpu_s": cpu, "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "best_val_accuracy": result.best["value"], "best_trial": result.best["trial"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--sampler", default="random", choices=tune.SAMPLERS)
    parser.add_argument("--pruner", default="hyperband", choices=[p for p in tune.PRUNERS if p != "none"])
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed, the same for both")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--limit-train", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="keep both tune folders here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tune-pruning-"))
    rows = []
    for pruner in ("none", args.pruner):
        print(f"--- search with pruner {pruner} ---", flush=True)
        rows.append(run(pruner, args, out))
    base, pruned = rows
    print(f"\nseed001 space, {args.trials} trials x {args.epochs} epochs, {args.dataset}, sampler {args.sampler} "
          f"seed {args.seed}, {args.threads} thread(s)\n")
    print("| pruner | wall s | CPU s | epochs trained | complete | pruned | best val_accuracy (trial) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['pruner']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | {row['epochs_trained']} | {row['complete']} | "
              f"{row['pruned']} | {row['best_val_accuracy']:.4f} ({row['best_trial']}) |")
    saved = 1 - pruned["wall_s"] / base["wall_s"]
    points = 100 * (base["best_val_accuracy"] - pruned["best_val_accuracy"])
    print(f"\nCPU time ratio pruned/unpruned {pruned['cpu_s'] / base['cpu_s']:.2f}")
    print(f"time ratio pruned/unpruned {pruned['wall_s'] / base['wall_s']:.2f} ({saved:.0%} saved); "
          f"best val_accuracy {points:+.2f} points lower with pruning")
    print(f"target (>= 30% saved, <= 0.5 points lower): {'met' if saved >= 0.3 and points <= 0.5 else 'NOT met'}")
    print("command: python benchmarks/tune_pruning.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
