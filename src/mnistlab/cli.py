"""The `mnistlab` command: parses flags and calls the Python API; no logic lives only here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .errors import MnistlabError


def parse_hparams(text: str) -> dict:
    """`conv_1_filter=64,dense_1_units=128` -> {"conv_1_filter": 64, "dense_1_units": 128}."""
    hparams = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        try:
            hparams[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            hparams[key.strip()] = value.strip()
    return hparams


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`batch_size` -> `--batch-size`), typed as config files are."""
    from .config import TrainConfig, setting_type
    for field in dataclasses.fields(TrainConfig):
        flag, default, kind = "--" + field.name.replace("_", "-"), field.default, setting_type(field.name)
        if field.name == "recipe":
            continue
        if kind is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"(default: {default})")
        elif kind is dict:
            parser.add_argument(flag, dest=field.name, type=parse_hparams, default=None, metavar="KEY=VALUE,...",
                                help="model hyperparameters, e.g. conv_1_filter=64,dense_1_units=128")
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None,
                                help=f"(default: {default})")


def cmd_train(args) -> None:
    from . import distributed
    from .config import TrainConfig, resolve_config, run_config
    from .train import fit
    if args.nproc < 1:
        raise MnistlabError(f"--nproc {args.nproc}: the number of processes must be at least 1")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.resume:
        if given or args.recipe or args.config or args.from_tune:
            raise MnistlabError("--resume continues a run with its own settings; drop the other settings flags")
        out = Path(args.resume)
        config = run_config(out)
    else:
        if args.from_tune:  # the best trial's settings; flags override them (e.g. --val-split 0 --limit-train 0)
            from .tune import best_config
            if args.recipe or args.config:
                raise MnistlabError("--from-tune takes the search's best settings; drop --recipe and --config")
            config = dataclasses.replace(best_config(args.from_tune), **given)
            config.validate()
        else:
            config = resolve_config(args.recipe, args.config, given)
        default = Path(args.from_tune) / "final" if args.from_tune else \
            Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(args.out) if args.out else default
        if (out / "metrics.json").exists() and not args.overwrite:
            raise MnistlabError(f"{out} already holds a finished run; pass another --out or add --overwrite")
        if (out / "resume.pt").exists() and not args.overwrite:
            raise MnistlabError(f"{out} holds an interrupted run; continue it with --resume {out}, "
                                "or pass another --out or --overwrite")
    if args.nproc > 1 and not distributed.launched():  # checked once here; the processes ignore --nproc
        distributed.check_global_batch(config.batch_size, args.nproc)
        if args.ensemble:
            raise MnistlabError("--ensemble trains its members one after another in one process; drop --nproc")
        named = args.out or args.resume  # else each process would name its own timestamped folder
        distributed.launch(args.nproc, args.argv if named else [*args.argv, "--out", str(out)], out)
        return
    if args.ensemble_models and not args.ensemble:
        raise MnistlabError("--ensemble-models names the members of an ensemble; add --ensemble N")
    if args.ensemble:
        if distributed.launched():
            raise MnistlabError("--ensemble trains its members one after another in one process; run it without torchrun")
        return train_ensemble(config, args, out)
    result = fit(config, out=out, data_dir=args.data_dir, progress=not args.quiet, resume=bool(args.resume))
    if not distributed.is_main():  # rank 0 reports for the job
        return
    m = result.metrics
    epochs = len(result.history)
    print(f"test_loss {m.test_loss:.4f} - test_accuracy {m.test_accuracy:.4f} ({m.num_test} images) - "
          f"train {result.train_seconds:.1f}s ({result.train_seconds / epochs:.1f}s/epoch, {epochs} epochs) - "
          f"run: {out}")
    if not args.no_report:  # after training, so plotting never slows it
        from .report import write_report
        print(f"report: {write_report(out, data_dir=args.data_dir)}")


def train_ensemble(config, args, out: Path) -> None:
    from .train import fit_ensemble
    if args.resume:
        raise MnistlabError(f"an ensemble continues when its command is run again: mnistlab train ... "
                            f"--ensemble {args.ensemble} --out {out}")
    models = [name.strip() for name in (args.ensemble_models or "").split(",") if name.strip()]
    figures = fit_ensemble(config, args.ensemble, out, args.data_dir, progress=not args.quiet, models=models)
    members = ", ".join(f"{a:.4f}" for a in figures["member_accuracies"])
    print(f"ensemble of {args.ensemble}: test_accuracy {figures['test_accuracy']:.4f} (members: {members}); "
          f"with TTA {figures['tta_test_accuracy']:.4f} - train {figures['train_seconds']:.1f}s in all - "
          f"{out / 'ensemble.json'}")
    if not args.no_report:  # each member's own report, as a single run gets
        from .report import write_report
        for member in map(Path, figures["members"]):
            if not (member / "report.html").is_file():
                write_report(member, data_dir=args.data_dir)
        print(f"reports: {out}/member-*/report.html")


def cmd_tune(args) -> None:
    from . import tune
    from .config import TrainConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    worker = dict(storage=args.storage, data_dir=args.data_dir, threads=args.threads or 0, progress=not args.quiet)
    if args.resume:
        search_flags = [flag for flag, value in (("--space", args.space), ("--sampler", args.sampler),
                        ("--pruner", args.pruner), ("--objective", args.objective), ("--study-name", args.study_name),
                        ("--out", args.out)) if value is not None]
        if search_flags or set(given) - {"threads"}:
            raise MnistlabError("--resume continues a search with its own settings; keep only --trials, "
                                "--threads, --storage and --quiet")
        tune.resume(args.resume, trials=args.trials, **worker)
        return
    if not args.space:
        raise MnistlabError(f"tune needs --space: a built-in space ({', '.join(tune.SPACES)}) or a TOML file")
    settings = tune.make_settings(args.space, given, trials=args.trials or 20, sampler=args.sampler or "tpe",
                                  pruner=args.pruner or "hyperband", objective=args.objective or "val_accuracy",
                                  study_name=args.study_name or "mnistlab")
    out = Path(args.out) if args.out else Path("tunes") / f"{settings.space_name.rsplit('/', 1)[-1].removesuffix('.toml')}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    tune.search(settings, out, **worker)


def cmd_models(args) -> None:
    from . import models
    width = max(map(len, models.MODELS))
    for name in sorted(models.MODELS):
        params = models.count_params(models.create_model(name))["total"]
        print(f"{name:<{width}}  {params:>10,} params  {models.MODELS[name].description}")


def cmd_summary(args) -> None:
    from . import models
    hparams = args.hparams or {}
    print(models.summary(models.create_model(args.name, **hparams), args.name))


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_run, format_analysis
    analysis = evaluate_run(Path(args.run), data_dir=args.data_dir, dataset=args.dataset, tta=args.tta)
    print(json.dumps(analysis.to_dict()) if args.json else format_analysis(analysis))


def cmd_report(args) -> None:
    from .report import write_report
    print(write_report(Path(args.run), data_dir=args.data_dir))


def cmd_compare(args) -> None:
    from .report import compare, format_comparison
    print(format_comparison(compare([Path(run) for run in args.runs], args.out, data_dir=args.data_dir)))
    print(f"learning curves: {args.out}")


def cmd_datasets(args) -> None:
    from . import data
    if args.action == "show":
        from .report import show_dataset
        if not args.name:
            raise MnistlabError(f"`datasets show` needs a data set name; one of: {', '.join(data.DATASETS)}")
        out = args.out or Path(f"{args.name}-samples.png")
        print(show_dataset(args.name, out, args.per_class, data_dir=args.data_dir))
        return
    found = data.available(args.data_dir)
    width = max(map(len, found))
    for name, where in found.items():
        info = data.get_info(name)
        status = f"available in {where}" if where else "not downloaded (fetched on first use)"
        print(f"{name:<{width}}  {len(info.classes)} classes  {status}")


def cmd_predict(args) -> None:
    from .predict import Predictor, image_files, predict_files
    if args.top_k < 1:
        raise MnistlabError(f"--top-k {args.top_k} must be at least 1")
    predictor = Predictor(Path(args.run), engine=args.engine, int8=args.int8)
    files = image_files(args.images)
    if not files:
        raise MnistlabError(f"no image files (.png .jpg .jpeg .bmp .gif .webp) in {', '.join(args.images)}; "
                            "pass image files or folders that hold some")
    rows = predict_files(predictor, files, args.top_k, args.show_input)
    failed = [row for row in rows if row.error]
    if args.json:
        print(json.dumps({"run": str(args.run), "model": predictor.arch.name, "dataset": predictor.dataset,
                          "engine": args.engine, "int8": args.int8, "predictions": [row.to_dict() for row in rows]}))
    else:
        width = max(len(row.file) for row in rows)
        for row in rows:
            if row.error:
                print(f"mnistlab: error: {row.error}", file=sys.stderr)
                continue
            top = ", ".join(f"{label} {p:.4f}" for label, p in row.top_k)
            print(f"{row.file:<{width}}  {row.label}  {row.probability:.4f}  top-{len(row.top_k)}: {top}")
        if args.show_input and len(failed) < len(rows):
            print(f"the 28x28 inputs the model saw: {args.show_input}/", file=sys.stderr)
    if failed:
        raise MnistlabError(f"{len(failed)} of {len(rows)} files could not be classified (see above); "
                            "fix or remove them")


def cmd_export(args) -> None:
    from .export import INT8_CHECK, export
    result = export(Path(args.run), args.format, args.out, args.data_dir)
    if result.accuracy:
        print(f"{result.path} (int8; accuracy on {INT8_CHECK:,} test images {result.accuracy[1]:.2%}, "
              f"PyTorch's {result.accuracy[0]:.2%})")
    else:
        print(f"{result.path} ({result.format}; max abs difference from PyTorch {result.max_abs_diff:.2g})")


def cmd_serve(args) -> None:
    try:
        from .serve import serve
    except ImportError as err:
        raise MnistlabError(f"serving needs the serve extra ({err.name} is missing); "
                            'pip install -e ".[serve]"') from None
    serve(Path(args.run), args.host, args.port, threads=args.threads, access_log=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import RECIPES
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
    p.add_argument("--recipe", choices=sorted(RECIPES), help="start from a tutorial's settings; flags override them")
    p.add_argument("--config", type=Path, help="TOML file of settings (keys = these flags); flags override it")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run in RUN with its own settings")
    p.add_argument("--from-tune", metavar="TUNE", help="train the best trial of the search in TUNE (same data, "
                   "split, seed, epochs; flags override them) and evaluate it on the test set once")
    add_config_flags(p)
    p.add_argument("--out", help="run folder to write (default: runs/MODEL-TIMESTAMP, or TUNE/final)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--ensemble", type=int, default=0, metavar="N", help="train N members (seeds seed..seed+N-1) "
                   "into --out/member-K and report their averaged probabilities; run again to continue")
    p.add_argument("--ensemble-models", metavar="A,B", help="the members' models, in turn (e.g. best,seed002: "
                   "member 1 best, 2 seed002, 3 best, ...); default: --model for all")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.html and its pictures at the end (see `mnistlab report`)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine (DistributedDataParallel under "
                   "torchrun; --batch-size is the global batch); for GPUs or machines use torchrun, see README")

    p = command("tune", cmd_tune, "search hyperparameters with Optuna (random or TPE sampling, hyperband "
                "pruning per epoch) on a validation split; resumable, shared by several workers via --storage")
    p.add_argument("--space", help="built-in space (seed001: the Keras Tuner tutorial's) or a TOML file")
    p.add_argument("--resume", metavar="TUNE", help="continue the search in TUNE with its own settings, or join it "
                   "as one more worker while it runs")
    p.add_argument("--trials", type=int, help="finished trials the study should reach, over all workers (default: 20)")
    p.add_argument("--sampler", choices=["random", "tpe"], help="random search or TPE (Bayesian) (default: tpe)")
    p.add_argument("--pruner", choices=["hyperband", "halving", "median", "none"],
                   help="stop poor trials early on the per-epoch validation metric (default: hyperband)")
    p.add_argument("--objective", choices=["val_accuracy", "val_loss"], help="(default: val_accuracy, the last epoch's)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL shared by several workers, e.g. "
                   "postgresql://user@host/db (default: sqlite in TUNE/study.db)")
    p.add_argument("--study-name", help="study name in the storage (default: mnistlab)")
    p.add_argument("--out", help="tune folder (default: tunes/SPACE-TIMESTAMP)")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    add_config_flags(p)  # fixed settings of every trial; --threads is this worker's torch thread count

    p = command("evaluate", cmd_evaluate, "reload a run folder and evaluate its model on the test set")
    p.add_argument("run", help="run folder written by `mnistlab train`")
    p.add_argument("--dataset", help="evaluate on another data set's test split")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tta", action="store_true", help="also report test-time augmentation (the mean "
                   "prediction over the image and its 1-pixel shifts), apart from the plain figures")

    p = command("report", cmd_report, "write report.html (metrics and pictures, self-contained) into a run folder")
    p.add_argument("run", help="run folder written by `mnistlab train`")

    p = command("compare", cmd_compare, "compare runs side by side and overlay their learning curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `mnistlab train`")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="learning curves PNG (default: compare.png)")

    p = command("datasets", cmd_datasets, "list the known data sets and where each is found; "
                "`datasets show NAME` draws samples of each class")
    p.add_argument("action", nargs="?", choices=["show"], help="show: a grid of samples per class")
    p.add_argument("name", nargs="?", help="data set to show")
    p.add_argument("--out", type=Path, help="PNG to write (default: NAME-samples.png)")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default: 10)")
    p = command("predict", cmd_predict, "classify image files (PNG, JPEG, BMP, GIF, WebP), each prepared "
                "the way the run's data set was made (MNIST: white on black, 20x20 box, centre of mass centred)")
    p.add_argument("run", help="run folder written by `mnistlab train`")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders walked for them")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--top-k", type=int, default=3, help="how many most probable classes to list (default: 3)")
    p.add_argument("--show-input", metavar="DIR", help="save the 28x28 image the model saw for each file into DIR")
    p.add_argument("--engine", choices=["torch", "onnx", "openvino"], default="torch",
                   help="run the model in PyTorch, ONNX Runtime (pip install 'mnistlab[onnx]') or OpenVINO "
                   "(pip install 'mnistlab[openvino]')")
    p.add_argument("--int8", action="store_true", help="run the int8 model (RUN/model.int8.onnx from `mnistlab "
                   "export --format int8`, else quantised at start) on --engine onnx or openvino")

    p = command("export", cmd_export, "export a run's model as ONNX (dynamic batch size), int8 ONNX or "
                "TorchScript, checked against PyTorch (logits within 1e-4; int8: test accuracy within 0.5 points)")
    p.add_argument("run", help="run folder written by `mnistlab train`")
    p.add_argument("--format", choices=["onnx", "int8", "torchscript"], default="onnx",
                   help="int8: quantised, calibrated on 1,000 training images, for --engine openvino --int8 "
                   "(default: onnx)")
    p.add_argument("--out", type=Path, help="file to write (default: RUN/model.onnx, model.int8.onnx or model.pt)")

    command("models", cmd_models, "list the model zoo with parameter counts")
    p = command("summary", cmd_summary, "print a model's layers, output shapes and parameters, as Keras does")
    p.add_argument("name", help="a model name from `mnistlab models`")
    p.add_argument("--hparams", type=parse_hparams, metavar="KEY=VALUE,...", help="model hyperparameters")

    p = command("serve", cmd_serve, "serve a run's model over HTTP: POST /predict, /model, /health, API docs "
                "at /docs, and a draw-a-digit page at /")
    p.add_argument("run", help="run folder written by `mnistlab train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2, or 1 on a "
                   "one-core machine: measured fastest with 8 clients on 2 cores)")
    p.add_argument("--quiet", action="store_true", help="no access-log line per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what --nproc runs in each process
    from .devices import reuse_freed_memory
    from .distributed import launched, rank
    from .train import Interrupted
    name = f"mnistlab[rank {rank()}]" if launched() else "mnistlab"  # which process of a job speaks
    reuse_freed_memory()  # every command: training steps and inference batches reuse freed memory
    try:
        args.func(args)
    except Interrupted as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 130
    except MnistlabError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
