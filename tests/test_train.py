import csv
import json

import pytest

from mnistlab import data
from mnistlab.errors import MnistlabError
from mnistlab.evaluate import evaluate_run
from mnistlab.train import TrainConfig, fit

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
