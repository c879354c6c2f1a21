"""The `mnistlab` command: parses flags and calls the Python API; no logic lives only here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .errors import MnistlabError


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per config field (`batch_size` -> `--batch-size`), typed by its default."""
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"(default: {default})")
        else:
            kind = float if field.name in ("lr", "val_split") else type(default) if default is not None else str
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=f"(default: {default})")


def config_from_args(args: argparse.Namespace, config_class):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
             if getattr(args, f.name) is not None}
    return config_class(**given)


def cmd_train(args) -> None:
    from .train import TrainConfig, fit
    config = config_from_args(args, TrainConfig)
    out = Path(args.out) if args.out else Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "metrics.json").exists() and not args.overwrite:
        raise MnistlabError(f"{out} already holds a finished run; pass another --out or add --overwrite")
    result = fit(config, out=out, data_dir=args.data_dir, progress=not args.quiet)
    m = result.metrics
    epochs = len(result.history)
    print(f"test_loss {m.test_loss:.4f} - test_accuracy {m.test_accuracy:.4f} ({m.num_test} images) - "
          f"train {result.train_seconds:.1f}s ({result.train_seconds / epochs:.1f}s/epoch) - run: {out}")


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_run
    metrics = evaluate_run(Path(args.run), data_dir=args.data_dir, dataset=args.dataset)
    if args.json:
        print(json.dumps(metrics.to_dict()))
    else:
        print(f"test_loss {metrics.test_loss:.4f} - test_accuracy {metrics.test_accuracy:.4f} "
              f"({metrics.num_test} images)")


def cmd_datasets(args) -> None:
    from . import data
    found = data.available(args.data_dir)
    width = max(map(len, found))
    for name, where in found.items():
        info = data.get_info(name)
        status = f"available in {where}" if where else "not downloaded (fetched on first use)"
        print(f"{name:<{width}}  {len(info.classes)} classes  {status}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .train import TrainConfig
    parser = argparse.ArgumentParser(prog="mnistlab", description="Train, evaluate and explain small CNNs "
                                     "for MNIST-family images.")
    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--data-dir", type=Path, default=None,
                       help="folder holding the data set files (default: $MNISTLAB_DATA, then the cache)")
        p.set_defaults(func=func)
        return p

    p = command("train", cmd_train, "train a model, evaluate it on the test set, write a run folder")
    add_config_flags(p, TrainConfig)
    p.add_argument("--out", help="run folder to write (default: runs/MODEL-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    p = command("evaluate", cmd_evaluate, "reload a run folder and evaluate its model on the test set")
    p.add_argument("run", help="run folder written by `mnistlab train`")
    p.add_argument("--dataset", help="evaluate on another data set's test split")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    command("datasets", cmd_datasets, "list the known data sets and where each is found")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MnistlabError as err:
        print(f"mnistlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
