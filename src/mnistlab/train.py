"""One training loop: the whole data set in memory, whole-tensor batches, Keras's semantics.

Reading order: TrainConfig (every setting) -> fit (data, model, optimizer, loop, run folder)
-> train_epoch (the hot path).
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__, data, models
from .errors import MnistlabError
from .evaluate import Metrics, evaluate
from .runfiles import write_csv, write_json


@dataclass
class TrainConfig:
    model: str = "seed003"
    dataset: str = "mnist"
    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "rmsprop"      # adam | rmsprop | sgd, with Keras's default settings
    lr: float | None = None         # None: Keras's default for the optimizer
    val_split: float = 0.1          # the tutorials hold out 10% of the training set
    seed: int = 0
    precision: str = "auto"         # auto | bf16 | fp32 (auto: bf16 where the CPU has it)
    channels_last: bool = True
    threads: int = 0                # 0: PyTorch's default (one per core)
    limit_train: int = 0            # >0: train on the first N training images (smoke tests)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Keras's defaults (keras.optimizers.*): all take learning rate 1e-3 except SGD (1e-2);
# Keras's epsilon is 1e-7 where PyTorch's is 1e-8.
KERAS_LR = {"adam": 1e-3, "rmsprop": 1e-3, "sgd": 1e-2}


def make_optimizer(name: str, params, lr: float | None) -> torch.optim.Optimizer:
    if name not in KERAS_LR:
        raise MnistlabError(f"unknown optimizer {name!r}; choose one of: {', '.join(KERAS_LR)}")
    lr = KERAS_LR[name] if lr is None else lr
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7)
    return torch.optim.SGD(params, lr=lr)


def bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise MnistlabError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    return precision


@dataclass
class RunResult:
    net: nn.Module
    config: TrainConfig
    history: list[dict]
    metrics: Metrics
    train_seconds: float
    out: Path | None


def fit(config: TrainConfig, out: Path | None = None, data_dir: Path | None = None,
        progress: bool = True) -> RunResult:
    """Train `config.model` on `config.dataset`, evaluate on its test set, write the run folder."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.epochs < 1 or config.batch_size < 1:
        raise MnistlabError("epochs and batch size must be at least 1; pass --epochs N --batch-size N")
    if not 0 <= config.val_split < 1:
        raise MnistlabError(f"val_split {config.val_split} is outside [0, 1); pass e.g. --val-split 0.1")
    precision = resolve_precision(config.precision)
    torch.manual_seed(config.seed)

    train_set = data.load(config.dataset, "train", data_dir)
    test_set = data.load(config.dataset, "test", data_dir)
    train_images, train_labels = train_set.images, train_set.labels
    if config.limit_train:
        train_images, train_labels = train_images[:config.limit_train], train_labels[:config.limit_train]
    val_images = val_labels = None
    if config.val_split > 0:
        train_images, train_labels, val_images, val_labels = data.train_val_split(
            train_images, train_labels, config.val_split, config.seed)

    classes = list(train_set.info.classes)
    net = models.create_model(config.model, len(classes))
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config.optimizer, net.parameters(), config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    history: list[dict] = []
    train_seconds = 0.0
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        loss, accuracy = train_epoch(net, optimizer, train_images, train_labels, config, precision,
                                     generator, desc=f"epoch {epoch}/{config.epochs}", progress=progress)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        row = {"epoch": epoch, "loss": loss, "accuracy": accuracy, "val_loss": "", "val_accuracy": ""}
        if val_images is not None:
            val = evaluate(net, val_images, val_labels, channels_last=config.channels_last)
            row.update(val_loss=val.loss, val_accuracy=val.accuracy)
        row.update(lr=optimizer.param_groups[0]["lr"], seconds=round(seconds, 3))
        history.append(row)
        if progress:
            print(format_row(row), file=sys.stderr)

    metrics = evaluate(net, test_set.images, test_set.labels, channels_last=config.channels_last)
    result = RunResult(net, config, history, metrics, train_seconds, Path(out) if out else None)
    if out:
        write_run(result, classes, precision)
    return result


def train_epoch(net, optimizer, images, labels, config: TrainConfig, precision: str,
                generator: torch.Generator, desc: str, progress: bool) -> tuple[float, float]:
    """One pass over shuffled whole-tensor batches; returns mean loss and accuracy (as Keras logs)."""
    net.train()
    n, batch_size = len(labels), config.batch_size
    order = torch.randperm(n, generator=generator)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    steps = math.ceil(n / batch_size)
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    for step in range(steps):
        index = order[step * batch_size:(step + 1) * batch_size]
        x, y = models.to_input(images[index], config.channels_last), labels[index]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise MnistlabError(f"the loss became {loss.item()} at step {step + 1} ({desc}); "
                                "lower the learning rate (--lr) or use --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        bar.update(len(y))
        if step % 50 == 0 or step == steps - 1:
            seen = min((step + 1) * batch_size, n)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            refresh=False)
    bar.close()
    return loss_sum.item() / n, correct.item() / n


def format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['loss']:.4f}", f"accuracy {row['accuracy']:.4f}"]
    if row["val_loss"] != "":
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_accuracy {row['val_accuracy']:.4f}"]
    parts += [f"lr {row['lr']:.2g}", f"{row['seconds']:.1f}s"]
    return " - ".join(parts)


def versions() -> dict:
    import numpy
    return {"mnistlab": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def write_run(result: RunResult, classes: list[str], precision: str) -> None:
    """The self-describing run folder: config, history, metrics, weights + architecture."""
    out, config = result.out, result.config
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**asdict(config), "resolved_precision": precision,
                                     "resolved_lr": result.history[0]["lr"], "versions": versions()})
    write_csv(out / "history.csv", result.history)
    models.save_model(result.net, models.Architecture(config.model, {}, len(classes), classes, config.dataset), out)
    write_json(out / "metrics.json", {**result.metrics.to_dict(), "epochs": len(result.history),
                                      "train_seconds": round(result.train_seconds, 3)})
