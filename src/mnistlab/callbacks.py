"""Keras's training callbacks, with Keras's meaning (keras/src/callbacks, Keras 3).

A callback sees the loop after each epoch (`on_epoch_end`, epoch counted from 0 as in Keras)
and once at the end; its `state_dict` is saved in the resumable checkpoint, so a resumed run
continues with the same patience counters and best values.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path


def maximise(monitor: str) -> bool:
    """Keras's mode='auto': accuracies go up, losses go down."""
    return "acc" in monitor


class Callback:
    def on_train_batch_end(self, step: int, loop) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict, loop) -> None: ...
    def on_train_end(self, loop) -> None: ...

    def state_dict(self) -> dict:
        # Exact plain types only: the checkpoint loads with weights_only=True, which refuses
        # subclasses such as enums.
        return {k: v for k, v in vars(self).items() if type(v) in (int, float, str, bool, type(None))}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by `factor` after `patience` epochs without an improvement of
    `monitor` by more than `min_delta`, never below `min_lr`; wait `cooldown` epochs after a cut."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_lr=0.0, min_delta=1e-4, cooldown=0):
        if factor >= 1.0:
            raise ValueError("ReduceLROnPlateau factor must be below 1")
        self.monitor, self.factor, self.patience, self.min_lr = monitor, factor, patience, min_lr
        self.min_delta, self.cooldown = min_delta, cooldown
        self.best = -math.inf if maximise(monitor) else math.inf
        self.wait = self.cooldown_counter = 0

    def improved(self, current: float) -> bool:
        if maximise(self.monitor):
            return current > self.best + self.min_delta
        return current < self.best - self.min_delta

    def on_epoch_end(self, epoch, logs, loop):
        current = logs[self.monitor]
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.improved(current):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience and loop.lr > self.min_lr:
                loop.set_lr(max(loop.lr * self.factor, self.min_lr))
                self.cooldown_counter, self.wait = self.cooldown, 0


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs (never after the first epoch);
    with restore_best_weights, end with the weights of the best epoch, as Keras 3 does."""

    def __init__(self, monitor="val_loss", patience=0, restore_best_weights=False, min_delta=0.0):
        self.monitor, self.patience, self.restore_best_weights = monitor, patience, restore_best_weights
        self.min_delta = abs(min_delta)
        self.best = -math.inf if maximise(monitor) else math.inf
        self.wait = self.stopped_epoch = self.best_epoch = 0
        self.best_weights: dict | None = None

    def improved(self, current: float) -> bool:
        if maximise(self.monitor):
            return current - self.min_delta > self.best
        return current + self.min_delta < self.best

    def on_epoch_end(self, epoch, logs, loop):
        current = logs[self.monitor]
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = copy.deepcopy(loop.eval_net.state_dict()), epoch
        self.wait += 1
        if self.improved(current):
            self.best, self.best_epoch, self.wait = current, epoch, 0
            if self.restore_best_weights:
                self.best_weights = copy.deepcopy(loop.eval_net.state_dict())
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            loop.stop_training = True

    def on_train_end(self, loop):
        if self.restore_best_weights and self.best_weights is not None:
            loop.eval_net.load_state_dict(self.best_weights)
            loop.log(f"restored the weights of the best epoch ({self.best_epoch + 1}, "
                     f"{self.monitor} {self.best:.4f})")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_weights": self.best_weights}


class ModelCheckpoint(Callback):
    """Write the weights to `path` after each epoch, or (save_best_only) only when `monitor` improves."""

    def __init__(self, path: Path, monitor="val_loss", save_best_only=True):
        self.path, self.monitor, self.save_best_only = Path(path), monitor, save_best_only
        self.best = -math.inf if maximise(monitor) else math.inf
        self.best_epoch = -1

    def on_epoch_end(self, epoch, logs, loop):
        current = logs[self.monitor]
        better = current > self.best if maximise(self.monitor) else current < self.best
        if better or not self.save_best_only:
            if better:
                self.best, self.best_epoch = current, epoch
            loop.save_weights(self.path)

