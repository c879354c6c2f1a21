"""Where ensembles stall: which images trained runs get wrong, alone, together and averaged.

    python benchmarks/ensemble_errors.py runs/best40/member-* runs/best60k/member-*
    python benchmarks/ensemble_errors.py runs/best40/member-1 runs/probe-s002-40 --val-split 0.05 --seed 0

On the test set by default (for the record: nothing is chosen on it); with --val-split F --seed S on
the validation split that `train --val-split F --seed S` holds out of the training set (all runs must
have held out that split, or the figures are not a validation). Prints each run's errors, how many
images all / at least half / any of the runs get wrong, the mean probability of all runs, and of
every pair.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from mnistlab import data, models
from mnistlab.errors import MnistlabError
from mnistlab.evaluate import predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--val-split", type=float, default=0.0, help="the validation fraction runs held out")
    parser.add_argument("--seed", type=int, default=0, help="the seed of that split")
    args = parser.parse_args()
    loaded = [models.load_model(run) for run in args.runs]
    nets, dataset = [net.to(memory_format=torch.channels_last) for net, _ in loaded], loaded[0][1].dataset
    if args.val_split:
        train = data.load(dataset, "train")
        *_, images, labels = data.train_val_split(train.images, train.labels, args.val_split, args.seed)
        where = f"validation split {args.val_split} of seed {args.seed}"
    else:
        test = data.load(dataset, "test")
        images, labels, where = test.images, test.labels, "test set"
    probs = [predict_logits(net, images).softmax(1) for net in nets]
    wrong = torch.stack([p.argmax(1) != labels for p in probs])
    errors = lambda p: int((p.argmax(1) != labels).sum())
    print(f"# ensemble_errors: {len(nets)} runs on the {where} ({len(labels)} images)\n")
    print("| run | errors |\n|---|---:|")
    for run, p in zip(args.runs, probs):
        print(f"| {run} | {errors(p)} |")
    times = wrong.sum(0)
    print(f"\nwrong in all {len(nets)}: {int((times == len(nets)).sum())}; in at least half: "
          f"{int((2 * times >= len(nets)).sum())}; in any: {int((times > 0).sum())}; "
          f"mean probability of all: {errors(sum(probs))} errors")
    if len(nets) > 1:
        print("\n| pair | errors shared | their mean probability |\n|---|---:|---:|")
        for (a, pa, wa), (b, pb, wb) in itertools.combinations(zip(args.runs, probs, wrong), 2):
            print(f"| {a} + {b} | {int((wa & wb).sum())} | {errors(pa + pb)} |")
    print("\ncommand: python benchmarks/ensemble_errors.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    try:
        main()
    except MnistlabError as err:
        sys.exit(f"ensemble_errors.py: error: {err}")
