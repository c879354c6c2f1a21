"""One training loop: the whole data set in memory, whole-tensor batches, Keras's semantics.

Reading order: fit (data, model, optimizer, callbacks, the epoch loop, the run folder) ->
train_epoch (the hot path) -> Loop (the state a resumable checkpoint holds).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__, data, distributed, kernels, models
from .augment import Augmentation, augment
from .callbacks import Callback, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from .config import TrainConfig
from .devices import autocast, resolve_precision, reuse_freed_memory
from .errors import MnistlabError
from .evaluate import Metrics
from .runfiles import atomic_path, write_csv, write_json

# Keras's defaults (keras.optimizers.*): learning rate 1e-3, except SGD's 1e-2; Keras's epsilon
# is 1e-7 where PyTorch's is 1e-8.
KERAS_LR = {"adam": 1e-3, "rmsprop": 1e-3, "sgd": 1e-2}
RESUME_FILE = "resume.pt"


class Interrupted(MnistlabError):
    """Ctrl-C or SIGTERM: the state was saved and the run can be resumed."""


class Diverged(MnistlabError):
    """The loss became NaN or infinite: the settings' fault (a search records the trial and goes on)."""


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":  # fused: one kernel for all parameters
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7, fused=True)
    if name == "rmsprop":  # PyTorch has no fused RMSprop: mnistlab's native one (torch's where it can't run)
        return kernels.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise MnistlabError(f"unknown optimizer {name!r}; choose one of: {', '.join(KERAS_LR)}")


def schedule_factor(kind: str, progress: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of all training steps."""
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "onecycle":  # warm up from lr/25 over the first 30%, then cosine down to ~0
        if progress < 0.3:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / 0.3))
        return 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))
    return 1.0


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy on integer labels (sparse) or on one-hot labels (categorical): the same loss."""
    target = F.one_hot(labels, logits.shape[1]).float() if config.loss == "categorical_crossentropy" else labels
    return F.cross_entropy(logits.float(), target, label_smoothing=config.label_smoothing)


class EMA:
    """An exponential moving average of the weights (and float buffers: BatchNorm statistics),
    updated after every step; it is the model that is validated, checkpointed and kept.
    The decay ramps up as min(decay, (1 + t) / (10 + t)) so early averages forget the random start."""

    def __init__(self, net: nn.Module, decay: float):
        self.net, self.decay, self.updates = copy.deepcopy(net), decay, 0
        self.net.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self.net.state_dict(), net.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], weight)
        for k in mine.keys() - set(floats):  # counters such as num_batches_tracked
            mine[k].copy_(theirs[k])


@dataclass
class RunResult:
    net: nn.Module
    config: TrainConfig
    history: list[dict]
    metrics: Metrics | None  # None when fit was told not to touch the test set
    train_seconds: float    # the epochs (training and validation), not loading or the final test
    out: Path | None
    load_seconds: float = 0.0


def fit(config: TrainConfig, out: Path | str | None = None, data_dir: Path | str | None = None,
        progress: bool = True, validation_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        callbacks: list[Callback] = (), resume: bool = False, evaluate_test: bool = True) -> RunResult:
    """Train `config.model` on `config.dataset`, evaluate it on the test set, write the run folder.

    validation_data: (uint8 images, labels) to validate on instead of a split of the training set.
    resume: continue the interrupted run in `out` from its resumable checkpoint.
    evaluate_test: False for search trials, which must never see the test set (metrics is None).
    """
    config.validate()
    reuse_freed_memory()
    previous_threads = torch.get_num_threads()
    threads = config.threads or distributed.default_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with distributed.process_group(config.device) as device:  # a no-op unless started by torchrun
            return _fit(config, device, Path(out) if out else None, data_dir, progress, validation_data,
                        callbacks, resume, evaluate_test)
    finally:
        torch.set_num_threads(previous_threads)  # a setting of this run, not of the whole process


def _fit(config, device, out, data_dir, progress, validation_data, callbacks, resume,
         evaluate_test) -> RunResult:
    precision = resolve_precision(config.precision, device)
    writer, progress = distributed.is_main(), progress and distributed.is_main()  # rank 0 writes and talks
    torch.manual_seed(config.seed)

    load_start = time.perf_counter()
    train_set = data.load(config.dataset, "train", data_dir)
    test_set = data.load(config.dataset, "test", data_dir)
    load_seconds = time.perf_counter() - load_start
    train_images, train_labels = train_set.images, train_set.labels
    if config.limit_train:
        train_images, train_labels = train_images[:config.limit_train], train_labels[:config.limit_train]
    if validation_data is None and config.val_data == "test":
        validation_data = (test_set.images, test_set.labels)
    elif validation_data is None and config.val_split > 0:
        train_images, train_labels, *validation_data = data.train_val_split(
            train_images, train_labels, config.val_split, config.seed if config.val_seed < 0 else config.val_seed)

    # The whole uint8 data set moves to the device once (47 MB for MNIST): batches never cross the bus.
    train_images, train_labels, test_images, test_labels = (t.to(device) for t in (
        train_images, train_labels, test_set.images, test_set.labels))
    if validation_data is not None:
        validation_data = tuple(t.to(device) for t in validation_data)

    classes = list(train_set.info.classes)
    net = models.create_model(config.model, len(classes), **config.hparams).to(device)
    distributed.check_batches(config.batch_size, len(train_labels), models.batchnorm_values(net))
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    base_lr = KERAS_LR[config.optimizer] if config.lr is None else config.lr
    loop = Loop(net, make_optimizer(config.optimizer, net.parameters(), base_lr), config, base_lr,
                math.ceil(len(train_labels) / config.batch_size), out, progress, device)
    loop.callbacks = list(callbacks) + keras_callbacks(config, out) + distributed.hooks_for_tests()
    if precision == "fp16":  # fp16's narrow range needs loss scaling; bf16's does not
        loop.scaler = torch.amp.GradScaler(device.type)
    if resume:
        loop.load(out / RESUME_FILE)
    elif out and writer:
        write_json(out / "config.json", {**asdict(config), "resolved_precision": precision, "resolved_lr": base_lr,
                                         "resolved_device": str(device), "world_size": distributed.world(),
                                         "versions": versions()})
    distributed.seed_dropout(config.seed, loop.epoch)
    loop.train_net = distributed.wrap(loop.train_net, device)

    with interrupt_handler(loop):
        while loop.epoch < config.epochs and not loop.stop_training:
            carried, start = loop.epoch_seconds, time.perf_counter()  # carried: before an interruption
            loss, accuracy = train_epoch(loop, train_images, train_labels, precision)
            logs = {"loss": loss, "accuracy": accuracy}
            if validation_data is not None:
                val = distributed.evaluate(loop.eval_net, *validation_data, channels_last=config.channels_last,
                                           precision=precision)
                logs.update(val_loss=val.loss, val_accuracy=val.accuracy)
            seconds = carried + time.perf_counter() - start
            row = {"epoch": loop.epoch + 1, "loss": loss, "accuracy": accuracy,
                   "val_loss": logs.get("val_loss", ""), "val_accuracy": logs.get("val_accuracy", ""),
                   "lr": loop.lr, "seconds": round(seconds, 3)}
            for callback in loop.callbacks:
                callback.on_epoch_end(loop.epoch, logs, loop)
            loop.history.append(row)
            loop.train_seconds += seconds
            loop.epoch, loop.step, loop.epoch_seconds = loop.epoch + 1, 0, 0.0
            loop.log(format_row(row))
            loop.save()  # a resumable checkpoint at every epoch end: a kill loses at most one epoch
    for callback in loop.callbacks:
        callback.on_train_end(loop)

    net = loop.eval_net
    if not evaluate_test:
        return RunResult(net, config, loop.history, None, loop.train_seconds, None, load_seconds)
    metrics = distributed.evaluate(net, test_images, test_labels, channels_last=config.channels_last)
    result = RunResult(net, config, loop.history, metrics, loop.train_seconds, out, load_seconds)
    if out and writer:
        write_run(result, classes)
        (out / RESUME_FILE).unlink(missing_ok=True)
    distributed.barrier()  # the other processes return once the run folder is complete
    return result


def fit_ensemble(config: TrainConfig, members: int, out: Path | str, data_dir: Path | str | None = None,
                 progress: bool = True, tta: bool = True, models: list[str] | tuple = ()) -> dict:
    """Train `members` models with seeds seed, seed + 1, ... into out/member-1.., then evaluate the
    mean of their probabilities on the test set into out/ensemble.json. With `models`, member k is
    models[k % len(models)] (different nets make different mistakes); all members hold out the same
    validation split. Running it again continues: finished members are kept and an interrupted one resumes."""
    from .evaluate import evaluate_ensemble
    if members < 1:
        raise MnistlabError(f"an ensemble needs at least 1 member, not {members}; pass e.g. --ensemble 5")
    models = list(models) or [config.model]
    if len(set(models)) > 1 and config.hparams:
        raise MnistlabError("hparams belong to one model, not to an ensemble of several; drop --hparams or "
                            "--ensemble-models")
    members_config = [dataclasses.replace(config, model=models[k % len(models)], seed=config.seed + k,
                                          val_seed=config.seed if config.val_seed < 0 else config.val_seed)
                      for k in range(members)]
    for member in members_config:
        member.validate()  # an unknown model name fails now, not after the first member's training
    out, runs = Path(out), []
    for k, member in enumerate(members_config):
        run = out / f"member-{k + 1}"
        if not (run / "metrics.json").is_file():
            if progress:
                print(f"ensemble member {k + 1}/{members} ({member.model}, seed {member.seed}): {run}", file=sys.stderr)
            fit(member, run, data_dir, progress, resume=(run / RESUME_FILE).is_file())
        runs.append(run)
    figures = {**evaluate_ensemble(runs, data_dir, tta), "config": asdict(config), "models": models,
               "train_seconds": sum(json.loads((run / "metrics.json").read_text())["train_seconds"] for run in runs)}
    write_json(out / "ensemble.json", figures)
    return figures


def train_epoch(loop: "Loop", images: torch.Tensor, labels: torch.Tensor, precision: str) -> tuple[float, float]:
    """One pass over shuffled whole-tensor batches; returns mean loss and accuracy, as Keras logs them.
    Starts at loop.step, so an epoch interrupted half way continues where it stopped."""
    net, optimizer, config = loop.train_net, loop.optimizer, loop.config
    net.train()
    n, batch_size, steps = len(labels), config.batch_size, loop.steps_per_epoch
    if loop.step == 0:
        loop.order = torch.randperm(n, generator=loop.shuffle_rng).to(labels.device)
        loop.loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
        loop.correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    aug = Augmentation.of(asdict(config))
    start = time.perf_counter()
    bar = tqdm(total=n, initial=min(loop.step * batch_size, n), desc=f"epoch {loop.epoch + 1}/{config.epochs}",
               unit="img", leave=False, disable=not loop.progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5)
    for step in range(loop.step, steps):
        loop.set_step_lr(loop.epoch * steps + step)
        batch = loop.order[step * batch_size:(step + 1) * batch_size]
        part = distributed.part(len(batch))  # this process's share of the global batch (all of it in one)
        index = batch[part]
        x, y = models.to_input(images[index], channels_last=False), labels[index]
        if aug.active:
            x = augment(x, aug, loop.augment_rng, len(batch), part)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, precision):
            logits = net(x)
        loss = loss_fn(logits, y, config)
        optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(distributed.weigh(loss, len(y), len(batch))).backward()
        loop.scaler.step(optimizer)
        loop.scaler.update()
        if loop.ema:
            loop.ema.update(loop.net)  # the module itself: a DDP wrapper's names differ
        with torch.no_grad():
            loop.loss_sum += loss.detach() * len(y)
            loop.correct += (logits.argmax(1) == y).sum()
        loop.step = step + 1
        bar.update(len(batch))
        # Reading a value off a GPU waits for it: there, only every 50 steps (NaN check, progress bar).
        sync = step % 50 == 0 or step == steps - 1
        if (sync or loop.device.type == "cpu") and not torch.isfinite(loop.loss_sum):
            where = f" (the state at the end of epoch {loop.epoch} is kept in {loop.out / RESUME_FILE})" \
                if loop.out and loop.epoch else ""
            by = "" if loop.device.type == "cpu" else "by "
            raise Diverged(f"the loss became {loop.loss_sum.item()} at epoch {loop.epoch + 1}, {by}step "
                                f"{step + 1}{where}; lower the learning rate (--lr) or use --precision fp32")
        if sync and loop.progress:
            seen = min((step + 1) * batch_size, n) / distributed.world()  # about this process's share
            bar.set_postfix(loss=f"{loop.loss_sum.item() / seen:.4f}", acc=f"{loop.correct.item() / seen:.4f}",
                            refresh=False)
        for callback in loop.callbacks:
            callback.on_train_batch_end(step, loop)
        if loop.interrupted:
            bar.close()
            loop.epoch_seconds += time.perf_counter() - start
            loop.save()
            where = f"; resume with: mnistlab train --resume {loop.out}" if loop.out else " (no run folder to save into)"
            raise Interrupted(f"training interrupted at epoch {loop.epoch + 1}, step {step + 1}{where}")
    bar.close()
    loss_sum, correct = distributed.all_reduce_sum(loop.loss_sum, loop.correct)  # every process's images
    return loss_sum.item() / n, correct.item() / n


class Loop:
    """The state of a run in progress: everything a resumable checkpoint must hold."""

    def __init__(self, net, optimizer, config: TrainConfig, base_lr: float, steps_per_epoch: int,
                 out: Path | None, progress: bool, device: torch.device = torch.device("cpu")):
        self.net, self.optimizer, self.config, self.base_lr = net, optimizer, config, base_lr
        self.steps_per_epoch, self.out, self.progress, self.device = steps_per_epoch, out, progress, device
        self.train_net = models.fused(net)  # what steps run through (fit wraps it for DDP)
        if isinstance(optimizer, kernels.RMSprop) or any(isinstance(m, kernels.MaxPoolReLU)
                                                          for m in self.train_net.modules()):
            kernels.library()  # built (once per machine) or found now, before any step is timed
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # fp16 enables one
        self.lr_scale = 1.0                   # what ReduceLROnPlateau has cut the rate to
        self.epoch = self.step = 0            # the next step to run
        self.epoch_seconds = self.train_seconds = 0.0
        self.order = self.loss_sum = self.correct = None
        self.history: list[dict] = []
        self.callbacks: list[Callback] = []
        self.stop_training = self.interrupted = False
        self.shuffle_rng = torch.Generator().manual_seed(config.seed)
        self.augment_rng = torch.Generator(device).manual_seed(config.seed + 1)  # augments on the device
        self.ema = EMA(net, config.ema) if config.ema else None

    @property
    def eval_net(self) -> nn.Module:
        """The model to validate, checkpoint and keep: the weight average when there is one."""
        return self.ema.net if self.ema else self.net

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        """Set the current rate (ReduceLROnPlateau); a schedule keeps its shape, scaled."""
        self.lr_scale *= lr / self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_step_lr(self, global_step: int) -> None:
        total = self.steps_per_epoch * self.config.epochs
        lr = self.base_lr * self.lr_scale * schedule_factor(self.config.lr_schedule, global_step / total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)

    def save_weights(self, path: Path) -> None:
        if distributed.is_main():
            models.save_weights(self.eval_net, path)

    def state(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "config": asdict(self.config),
                "lr_scale": self.lr_scale, "epoch": self.epoch, "step": self.step, "order": self.order,
                "loss_sum": self.loss_sum, "correct": self.correct, "epoch_seconds": self.epoch_seconds,
                "train_seconds": self.train_seconds, "history": self.history,
                "stop_training": self.stop_training, "rng": torch.get_rng_state(),
                "shuffle_rng": self.shuffle_rng.get_state(), "augment_rng": self.augment_rng.get_state(),
                "callbacks": [c.state_dict() for c in self.callbacks], "scaler": self.scaler.state_dict(),
                **({"ema": self.ema.net.state_dict(), "ema_updates": self.ema.updates} if self.ema else {})}

    def save(self) -> None:
        if self.out and distributed.is_main():
            with atomic_path(self.out / RESUME_FILE) as tmp:
                torch.save(self.state(), tmp)

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise MnistlabError(f"{path.parent} has no {RESUME_FILE} to resume from; it finished, or was "
                                "never started: start a new run with --out")
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")  # plain tensors: no code runs
        except Exception as err:  # a truncated or foreign file: torch raises several types
            raise MnistlabError(f"cannot read {path} ({type(err).__name__}); start the run again") from err
        # Settings added to mnistlab after the checkpoint was written take their defaults.
        if {**asdict(TrainConfig()), **state["config"]} != asdict(self.config):
            raise MnistlabError(f"{path} was written with other settings; resume with the run's own "
                                "settings (mnistlab train --resume RUN, no other flags)")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema:
            self.ema.net.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        for key in ("lr_scale", "epoch", "step", "order", "loss_sum", "correct", "epoch_seconds",
                    "train_seconds", "history", "stop_training"):
            setattr(self, key, state[key])
        self.order, self.loss_sum, self.correct = (None if t is None else t.to(self.device)
                                                   for t in (self.order, self.loss_sum, self.correct))
        self.scaler.load_state_dict(state.get("scaler", {}))
        torch.set_rng_state(state["rng"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        try:
            self.augment_rng.set_state(state["augment_rng"])  # a CPU and a GPU generator's states differ
        except RuntimeError:
            raise MnistlabError(f"{path} was written by a run on another kind of device; resume it where it "
                                f"ran (this one trains on {self.device.type})") from None
        for callback, callback_state in zip(self.callbacks, state["callbacks"]):
            callback.load_state_dict(callback_state)
        self.log(f"resuming {self.out} at epoch {self.epoch + 1}, step {self.step + 1}")


@contextlib.contextmanager
def interrupt_handler(loop: Loop):
    """First Ctrl-C / SIGTERM: finish the step, save, stop. A second Ctrl-C stops at once. Processes of
    a distributed job stop at once (they would stop at different steps); resume.pt holds the last epoch."""
    if threading.current_thread() is not threading.main_thread() or distributed.world() > 1:
        yield
        return

    def request_stop(signum, frame):
        loop.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def keras_callbacks(config: TrainConfig, out: Path | None) -> list[Callback]:
    """The callbacks a config turns on, in Keras's order of effect."""
    callbacks: list[Callback] = []
    if config.checkpoint_monitor and out:
        callbacks.append(ModelCheckpoint(out / "best.safetensors", config.checkpoint_monitor, config.save_best_only))
    if config.reduce_lr_monitor:
        callbacks.append(ReduceLROnPlateau(config.reduce_lr_monitor, config.reduce_lr_factor,
                                           config.reduce_lr_patience, config.reduce_lr_min_lr))
    if config.early_stopping_monitor:
        callbacks.append(EarlyStopping(config.early_stopping_monitor, config.early_stopping_patience,
                                       config.restore_best_weights))
    if config.tensorboard and out:
        from .report import TensorBoard  # matplotlib and tensorboard load only when asked for
        callbacks.append(TensorBoard(out / "tensorboard"))
    return callbacks


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


def write_run(result: RunResult, classes: list[str]) -> None:
    """The self-describing run folder: history, metrics, weights + architecture (config.json is
    written when training starts)."""
    out, config = result.out, result.config
    write_csv(out / "history.csv", result.history)
    models.save_model(result.net, models.Architecture(config.model, config.hparams, len(classes), classes,
                                                      config.dataset), out)
    write_json(out / "metrics.json", {**result.metrics.to_dict(), "epochs": len(result.history),
                                      "train_seconds": round(result.train_seconds, 3),
                                      "load_seconds": round(result.load_seconds, 3)})
