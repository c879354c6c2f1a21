"""Keras callback semantics on small synthetic problems: a scripted metric per epoch."""
import math

import pytest
import torch

from mnistlab.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from mnistlab.models import save_weights


class FakeLoop:
    """What a callback sees of the training loop: the network it keeps, a learning rate, a stop flag."""

    def __init__(self, lr=1.0):
        self.net = self.eval_net = torch.nn.Linear(1, 1)
        self.lr, self.stop_training, self.saved, self.messages = lr, False, [], []

    def set_lr(self, lr):
        self.lr = lr

    def save_weights(self, path):
        save_weights(self.net, path)
        self.saved.append(self.net.weight.item())

    def log(self, message):
        self.messages.append(message)


def run(callback, values, monitor="val_loss", loop=None):
    """Feed one value per epoch; returns the loop and the epochs at whose end training stopped."""
    loop = loop or FakeLoop()
    for epoch, value in enumerate(values):
        with torch.no_grad():
            loop.net.weight.fill_(epoch)  # the weights remember which epoch produced them
        callback.on_epoch_end(epoch, {monitor: value}, loop)
        if loop.stop_training:
            break
    callback.on_train_end(loop)
    return loop, epoch


def test_reduce_lr_on_plateau_cuts_after_patience_and_respects_min_lr():
    lrs = []
    cb, loop = ReduceLROnPlateau("val_loss", factor=0.5, patience=2, min_lr=0.2), FakeLoop()
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]):
        cb.on_epoch_end(epoch, {"val_loss": value}, loop)
        lrs.append(loop.lr)
    # epochs 2,3 do not improve on 0.9 -> cut at epoch 3; wait resets; cut again at 5; 7 hits min_lr.
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2]


def test_reduce_lr_min_delta_and_accuracy_is_maximised():
    cb, loop = ReduceLROnPlateau("val_accuracy", factor=0.1, patience=1), FakeLoop()
    for epoch, value in enumerate([0.90, 0.95, 0.95005]):  # +0.00005 is below min_delta 1e-4
        cb.on_epoch_end(epoch, {"val_accuracy": value}, loop)
    assert loop.lr == pytest.approx(0.1)
    cb, loop = ReduceLROnPlateau("val_accuracy", factor=0.1, patience=1), FakeLoop()
    for epoch, value in enumerate([0.90, 0.95, 0.96]):
        cb.on_epoch_end(epoch, {"val_accuracy": value}, loop)
    assert loop.lr == 1.0


def test_early_stopping_waits_patience_epochs_then_stops():
    loop, stopped = run(EarlyStopping("val_loss", patience=2), [1.0, 0.8, 0.9, 0.85, 0.7])
    assert loop.stop_training and stopped == 3  # no improvement at epochs 2 and 3


def test_early_stopping_never_stops_after_the_first_epoch_and_maximises_accuracy():
    loop, _ = run(EarlyStopping("val_loss", patience=0), [1.0])
    assert not loop.stop_training
    loop, stopped = run(EarlyStopping("accuracy", patience=1), [0.5, 0.6, 0.55, 0.7], monitor="accuracy")
    assert stopped == 2


def test_early_stopping_restores_the_best_epochs_weights_at_the_end():
    cb = EarlyStopping("val_loss", patience=2, restore_best_weights=True)
    loop, stopped = run(cb, [1.0, 0.5, 0.7, 0.8, 0.9])
    assert stopped == 3 and loop.net.weight.item() == 1.0  # epoch 1 had the best val_loss
    # Like Keras 3, the best weights come back even when training ran to the end.
    loop, _ = run(EarlyStopping("val_loss", patience=10, restore_best_weights=True), [1.0, 0.2, 0.4])
    assert not loop.stop_training and loop.net.weight.item() == 1.0
    assert "best epoch (2" in loop.messages[-1]


def test_early_stopping_state_survives_a_round_trip():
    cb = EarlyStopping("val_loss", patience=3, restore_best_weights=True)
    run(cb, [1.0, 0.5, 0.7])
    again = EarlyStopping("val_loss", patience=3, restore_best_weights=True)
    again.load_state_dict(cb.state_dict())
    assert (again.wait, again.best, again.best_epoch) == (1, 0.5, 1)
    assert torch.equal(again.best_weights["weight"], cb.best_weights["weight"])


def test_model_checkpoint_saves_only_improvements(tmp_path):
    loop, _ = run(ModelCheckpoint(tmp_path / "best.safetensors", "val_loss", save_best_only=True),
                  [1.0, 0.5, 0.7, 0.4, math.inf])
    assert loop.saved == [0.0, 1.0, 3.0] and (tmp_path / "best.safetensors").is_file()
    loop, _ = run(ModelCheckpoint(tmp_path / "every.safetensors", "val_loss", save_best_only=False), [1.0, 2.0, 3.0])
    assert loop.saved == [0.0, 1.0, 2.0]
