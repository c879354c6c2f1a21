import csv
import json
import os
import signal
import time

import pytest
import torch

from mnistlab.callbacks import Callback
from mnistlab.errors import MnistlabError
from mnistlab.evaluate import evaluate_run
from mnistlab.train import RESUME_FILE, Interrupted, TrainConfig, fit, loss_fn

SMALL = dict(model="seed003", epochs=2, batch_size=64, optimizer="rmsprop", limit_train=6000, seed=0)


@pytest.fixture(scope="module")
def small_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return fit(TrainConfig(**SMALL), out=out, data_dir=mnist_dir, progress=False)


def test_real_mnist_training_learns(small_run):
    first, last = small_run.history[0], small_run.history[-1]
    assert last["loss"] < first["loss"]
    assert last["val_accuracy"] > 0.85  # chance is 0.10
    assert small_run.metrics.test_accuracy > 0.85
    assert small_run.metrics.num_test == 10_000


def test_run_folder_is_self_describing(small_run):
    out = small_run.out
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "seed003" and config["seed"] == 0 and config["epochs"] == 2
    assert {"torch", "numpy", "python", "mnistlab"} <= set(config["versions"])
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(1e-3)  # Keras's RMSprop default
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    assert metrics["num_test"] == 10_000 and metrics["epochs"] == 2 and metrics["train_seconds"] > 0
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()


def test_epoch_seconds_add_up_to_no_more_than_the_wall_time(mnist_dir):
    start = time.perf_counter()
    result = fit(TrainConfig(**{**SMALL, "limit_train": 3000}), data_dir=mnist_dir, progress=False)
    wall = time.perf_counter() - start
    assert 0 < result.train_seconds == pytest.approx(sum(row["seconds"] for row in result.history), abs=0.01)
    assert result.train_seconds < wall


def test_evaluate_round_trip_reproduces_stored_metrics(small_run, mnist_dir):
    stored = json.loads((small_run.out / "metrics.json").read_text())
    again = evaluate_run(small_run.out, data_dir=mnist_dir)
    assert again.test_accuracy == stored["test_accuracy"]
    assert again.test_loss == pytest.approx(stored["test_loss"], rel=1e-6)


def test_training_is_reproducible_for_a_seed(mnist_dir):
    config = TrainConfig(**{**SMALL, "epochs": 1, "limit_train": 1000, "precision": "fp32"})
    a = fit(config, data_dir=mnist_dir, progress=False)
    b = fit(config, data_dir=mnist_dir, progress=False)
    assert a.history[0]["loss"] == b.history[0]["loss"]
    assert a.metrics.test_accuracy == b.metrics.test_accuracy


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "adamw2"}, "unknown optimizer 'adamw2'"),
    ({"model": "nope"}, "unknown model 'nope'"),
    ({"epochs": 0}, "at least 1"),
    ({"val_split": 1.5}, "outside"),
    ({"precision": "fp8"}, "unknown precision"),
])
def test_bad_settings_are_clear_errors(mnist_dir, change, message):
    with pytest.raises(MnistlabError, match=message):
        fit(TrainConfig(**{**SMALL, **change}), data_dir=mnist_dir, progress=False)


# --- Keras semantics in the loop -----------------------------------------------------------------

TINY = dict(model="seed004", epochs=2, batch_size=100, limit_train=1500, seed=3, rotation_range=10,
            width_shift_range=0.1, zoom_range=0.1)  # dropout and augmentation: every RNG is in play


class SignalAt(Callback):
    """Sends the process a real signal after a given step of a given epoch, as Ctrl-C would."""

    def __init__(self, epoch, step, signum=signal.SIGINT):
        self.epoch, self.step, self.signum = epoch, step, signum

    def on_train_batch_end(self, step, loop):
        if (loop.epoch, step) == (self.epoch, self.step):
            os.kill(os.getpid(), self.signum)


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_ends_where_an_uninterrupted_run_does(mnist_dir, tmp_path, signum):
    config = TrainConfig(**TINY)
    whole = fit(config, out=tmp_path / "whole", data_dir=mnist_dir, progress=False)
    with pytest.raises(Interrupted, match="resume with: mnistlab train --resume"):
        fit(config, out=tmp_path / "cut", data_dir=mnist_dir, progress=False, callbacks=[SignalAt(1, 4, signum)])
    assert (tmp_path / "cut" / RESUME_FILE).is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = fit(config, out=tmp_path / "cut", data_dir=mnist_dir, progress=False, resume=True)
    expected, got = weights(whole.net), weights(resumed.net)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert resumed.metrics.test_accuracy == whole.metrics.test_accuracy
    assert not (tmp_path / "cut" / RESUME_FILE).exists()  # a finished run keeps no resume state


def test_resume_refuses_other_settings_and_missing_state(mnist_dir, tmp_path):
    with pytest.raises(MnistlabError, match="no resume.pt"):
        fit(TrainConfig(**TINY), out=tmp_path, data_dir=mnist_dir, progress=False, resume=True)
    with pytest.raises(Interrupted):
        fit(TrainConfig(**TINY), out=tmp_path, data_dir=mnist_dir, progress=False, callbacks=[SignalAt(0, 2)])
    with pytest.raises(MnistlabError, match="other settings"):
        fit(TrainConfig(**{**TINY, "epochs": 3}), out=tmp_path, data_dir=mnist_dir, progress=False, resume=True)


class PoisonAt(Callback):
    """Turns the weights into NaN after a given step, as a diverging run would."""

    def __init__(self, epoch, step):
        self.epoch, self.step = epoch, step

    def on_train_batch_end(self, step, loop):
        if (loop.epoch, step) == (self.epoch, self.step):
            with torch.no_grad():
                next(loop.net.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(mnist_dir, tmp_path):
    with pytest.raises(MnistlabError, match=r"loss became nan at epoch 2, step 4 .*resume.pt.*--lr"):
        fit(TrainConfig(**TINY), out=tmp_path, data_dir=mnist_dir, progress=False, callbacks=[PoisonAt(1, 2)])
    state = torch.load(tmp_path / RESUME_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["net"].values())


def test_categorical_and_sparse_cross_entropy_train_the_same(mnist_dir):
    runs = [fit(TrainConfig(**{**TINY, "epochs": 1, "precision": "fp32", "loss": loss}), data_dir=mnist_dir,
                progress=False) for loss in ("sparse_categorical_crossentropy", "categorical_crossentropy")]
    a, b = weights(runs[0].net), weights(runs[1].net)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert runs[0].history[0]["loss"] == pytest.approx(runs[1].history[0]["loss"], rel=1e-5)


def test_label_smoothing_matches_the_keras_formula():
    logits, labels = torch.randn(6, 10), torch.tensor([0, 1, 2, 3, 4, 5])
    config = TrainConfig(label_smoothing=0.1, loss="categorical_crossentropy")
    target = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.1 / 10  # Keras: y(1-a) + a/K
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert loss_fn(logits, labels, config).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_fn(logits, labels, TrainConfig(label_smoothing=0.1)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_callbacks_run_in_a_real_fit(mnist_dir, tmp_path):
    # A learning rate of 1e-9 leaves the model as it is, so val_accuracy never improves after epoch 1.
    config = TrainConfig(**{**TINY, "epochs": 3, "optimizer": "sgd", "lr": 1e-9, "checkpoint_monitor": "val_accuracy",
                            "reduce_lr_monitor": "val_accuracy", "reduce_lr_patience": 0, "reduce_lr_factor": 0.5})
    result = fit(config, out=tmp_path, data_dir=mnist_dir, progress=False)
    assert (tmp_path / "best.safetensors").is_file()
    # patience 0: each epoch without improvement halves the rate for the next one; a row logs the
    # rate its epoch ran at, as Keras's history does.
    assert [row["lr"] for row in result.history] == pytest.approx([1e-9, 1e-9, 5e-10], rel=1e-6)


def test_validation_on_the_test_set_as_one_tutorial_does(mnist_dir):
    result = fit(TrainConfig(**{**TINY, "epochs": 1, "val_data": "test", "precision": "fp32"}), data_dir=mnist_dir,
                 progress=False)
    assert result.history[0]["val_accuracy"] == pytest.approx(result.metrics.test_accuracy)


def test_ema_is_a_running_average_of_the_weights():
    from mnistlab.train import EMA
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    before = weights(ema.net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 2))  # moves the BatchNorm statistics and its counter
    ema.update(net)
    step = 1 - min(0.9, 2 / 11)  # the warm-up decay of the first update
    assert torch.allclose(ema.net[0].weight, before["0.weight"] + step * 1.0)
    assert torch.allclose(ema.net[1].running_mean, before["1.running_mean"] + step * net[1].running_mean)
    assert ema.net[1].num_batches_tracked == net[1].num_batches_tracked == 1
    assert not any(p.requires_grad for p in ema.net.parameters())


def test_ema_model_is_the_one_kept_and_resumes_bit_identically(mnist_dir, tmp_path):
    config = TrainConfig(**{**TINY, "ema": 0.99})
    whole = fit(config, out=tmp_path / "whole", data_dir=mnist_dir, progress=False)
    with pytest.raises(Interrupted):
        fit(config, out=tmp_path / "cut", data_dir=mnist_dir, progress=False, callbacks=[SignalAt(1, 4, signal.SIGINT)])
    resumed = fit(config, out=tmp_path / "cut", data_dir=mnist_dir, progress=False, resume=True)
    expected, got = weights(whole.net), weights(resumed.net)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    plain = fit(TrainConfig(**TINY), data_dir=mnist_dir, progress=False)
    assert not torch.equal(plain.net[0].weight, whole.net[0].weight)  # the average, not the last step
    stored = evaluate_run(tmp_path / "whole")  # the saved weights are the average's
    assert stored.test_accuracy == whole.metrics.test_accuracy


def test_ensemble_averages_members_and_continues_where_it_stopped(mnist_dir, tmp_path, monkeypatch):
    from mnistlab import train
    config = TrainConfig(**{**SMALL, "epochs": 1, "limit_train": 1000})
    with pytest.raises(MnistlabError, match="unknown model 'nope'"):  # before any member trains
        train.fit_ensemble(config, 2, tmp_path / "e", mnist_dir, progress=False, models=["seed003", "nope"])
    assert not (tmp_path / "e").exists()
    figures = train.fit_ensemble(config, 2, tmp_path / "e", mnist_dir, progress=False, tta=False,
                                 models=["seed003", "fast"])
    members = [json.loads((tmp_path / "e" / f"member-{k}" / "config.json").read_text()) for k in (1, 2)]
    assert [m["seed"] for m in members] == [0, 1] and [m["model"] for m in members] == ["seed003", "fast"]
    assert [m["val_seed"] for m in members] == [0, 0]  # one validation split for the whole ensemble
    stored = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert stored["test_accuracy"] == figures["test_accuracy"] and stored["num_test"] == 10_000
    assert len(set(figures["member_accuracies"])) == 2 and 0.2 < figures["test_accuracy"] <= 1  # chance: 0.1
    probs = [evaluate_run(tmp_path / "e" / f"member-{k}") for k in (1, 2)]
    assert [p.test_accuracy for p in probs] == figures["member_accuracies"]
    # run again: finished members are kept, not trained again
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a finished member was trained again"))
    with pytest.raises(MnistlabError, match="at least 1 member"):
        train.fit_ensemble(config, 0, tmp_path / "e0", mnist_dir, progress=False)
    again = train.fit_ensemble(config, 2, tmp_path / "e", mnist_dir, progress=False, tta=False)
    assert again["test_accuracy"] == figures["test_accuracy"]
