"""Hyperparameter search: the space parser, pruning, resume after a kill, several workers on one
study (SQLite and a real PostgreSQL server), and `train --from-tune` reproducing the best trial.

Tiny data (the first 1,000 MNIST training images, 2 epochs, one thread) keeps the file near a minute.
"""
import csv
import glob
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import optuna  # in the dev extra: the tests never skip for want of it
import pytest

from mnistlab import cli, distributed, models, tune
from mnistlab.config import TrainConfig
from mnistlab.errors import MnistlabError


TINY_SPACE = """
model = "seed001"
optimizer = "adam"
[search]
conv_1_filter = { int = [32, 48], step = 16 }
dense_1_units = { int = [32, 64], step = 32 }
lr = { float = [1e-6, 3e-3], log = true }
"""
TINY_FLAGS = ["--epochs", "2", "--limit-train", "1000", "--threads", "1", "--sampler", "random"]


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.toml"
    path.write_text(TINY_SPACE)
    return path


def worker_env(mnist_dir) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MNISTLAB_DATA": str(mnist_dir)}


def start_worker(args: list[str], mnist_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnistlab", "tune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=worker_env(mnist_dir))


def trial_numbers(stdout: str) -> list[int]:
    """The trials a worker reports, from its live lines."""
    return [int(n) for n in re.findall(r"^trial\s+(\d+) ", stdout, flags=re.M)]


def finish(worker: subprocess.Popen, timeout: float = 120) -> str:
    out, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err
    return out


def load(url: str, name: str = "mnistlab"):
    return optuna.load_study(study_name=name, storage=url)


def finished_numbers(study) -> set[int]:
    return {t.number for t in study.get_trials() if tune.finished(t)}


# --- The space parser ---------------------------------------------------------------------------

def test_builtin_seed001_space_is_the_keras_tuner_tutorials():
    settings = tune.make_settings("seed001", {"dataset": "mnist", "epochs": 2}, trials=10)
    space = settings.parsed_space()
    assert settings.base().model == "seed001" and settings.base().optimizer == "adam"
    assert settings.base().batch_size == 32 and settings.base().dataset == "mnist"  # the flag beat the recipe
    for name, allowed in models.SEED001_SPACE.items():
        assert space.search[name].values() == list(allowed)
    assert space.search["lr"].values() == [1e-2, 1e-3]


def test_trial_config_maps_model_hyperparameters_settings_and_augmentation():
    base = TrainConfig(model="seed004")
    config = tune.trial_config(base, {"dropout": 0.4, "lr": 3e-4, "batch_size": 128, "augment": 0.5,
                                      "elastic_alpha": 30.0})
    assert config.hparams == {"dropout": 0.4} and config.lr == 3e-4 and config.batch_size == 128
    assert config.elastic_alpha == 30.0 and config.elastic_sigma == 4.0
    assert config.rotation_range == 5.0 and config.zoom_range == pytest.approx(0.05)
    net = models.create_model("seed004", **config.hparams)
    assert [m.p for m in net.modules() if isinstance(m, models.nn.Dropout)] == [0.4]


BAD_SPACES = [
    ({"modle": "seed001", "search": {"lr": {"choice": [1e-3]}}}, "unknown setting 'modle'"),
    ({"model": "seed001", "search": {"conv1_filter": {"int": [32, 64]}}}, "unknown search key 'conv1_filter'"),
    ({"model": "seed001", "search": {"conv_1_filter": {"int": [64, 64]}}}, "is empty"),
    ({"model": "seed001", "search": {"conv_1_filter": {"int": [128, 32], "step": 16}}}, "low 128 is above high 32"),
    ({"model": "seed001", "search": {"lr": {"loguniform": [1e-4, 1e-2]}}}, "unknown distribution 'loguniform'"),
    ({"model": "seed001", "search": {"lr": {"float": [1e-4, 1e-2], "logg": True}}}, "unknown option logg"),
    ({"model": "seed001", "search": {"conv_1_filter": {"int": [16, 128], "step": 16}}},
     "conv_1_filter value 16 is outside seed001's space (32..128 step 16)"),
    ({"model": "seed001", "search": {"conv_1_kernel": {"choice": [3, 7]}}}, "value 7 is outside seed001's space"),
    ({"model": "seed004", "search": {"dropout": {"float": [0.2, 1.0]}}}, "value 1.0 is outside seed004's space"),
    ({"model": "seed003", "search": {"dropout": {"float": [0.1, 0.5]}}}, "search a hyperparameter of seed003 (none)"),
    ({"model": "seed001", "search": {"lr": {"choice": []}}}, "non-empty list"),
    ({"model": "seed001", "search": {"lr": {"float": [0, 1e-2], "log": True}}}, "needs low > 0"),
    ({"model": "seed001", "search": {"conv_1_filter": {"int": [32, 120], "step": 16}}}, "end it at 112"),
    ({"model": "seed001"}, "has no [search] table"),
    ({"model": "seed001", "search": {"epochs": {"int": [1, 5]}}}, "epochs stays fixed during a search"),
    ({"model": "seed001", "search": {"optimizer": {"choice": ["adam", "adamw"]}}}, "unknown optimizer 'adamw'"),
    ({"model": "seed001", "search": {"lr": [1e-3, 1e-2]}}, "is not a distribution"),
    ({"model": "seed001", "val_data": "test", "search": {"lr": {"choice": [1e-3, 1e-2]}}}, "never on the test set"),
]


@pytest.mark.parametrize("raw, message", BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_space_is_one_clear_line(raw, message):
    with pytest.raises(MnistlabError) as err:
        tune.make_settings(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flag_that_the_space_searches_is_refused_and_cli_prints_one_line(tmp_path, capsys):
    with pytest.raises(MnistlabError, match="lr is searched by space seed001"):
        tune.make_settings("seed001", {"lr": 1e-3})
    with pytest.raises(MnistlabError, match="conv_1_filter is searched by space seed001"):
        tune.make_settings("seed001", {"hparams": {"conv_1_filter": 64}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[search]\nlr = {float = [1e-2, 1e-4]}\n")
    assert cli.main(["tune", "--space", str(bad), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "low 0.01 is above high 0.0001" in err
    assert not (tmp_path / "t").exists()  # nothing started


# --- One search in this process: pruning, results, never the test set, --from-tune -------------------

@pytest.fixture(scope="module")
def searched(mnist_dir, tiny_space, tmp_path_factory):
    """Six hyperband trials; every evaluate() call is recorded to prove the test set is never used."""
    out = tmp_path_factory.mktemp("tune") / "tiny"
    evaluated, real_evaluate = [], distributed.evaluate

    def recording_evaluate(net, images, labels, **kwargs):
        evaluated.append(len(labels))
        return real_evaluate(net, images, labels, **kwargs)

    distributed.evaluate = recording_evaluate  # what fit scores validation and test data with
    try:
        settings = tune.make_settings(tiny_space, {"epochs": 2, "limit_train": 1000}, trials=6, sampler="random",
                                      pruner="hyperband")
        result = tune.search(settings, out, data_dir=mnist_dir, threads=1, progress=True)
    finally:
        distributed.evaluate = real_evaluate
    return result, evaluated


def test_hyperband_prunes_trials_after_fewer_epochs(searched):
    result, _ = searched
    trials = result.study.get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 6
    assert pruned and all(len(t.intermediate_values) < 2 for t in pruned)
    assert complete and all(len(t.intermediate_values) == 2 for t in complete)
    # the pruned ones were worse at epoch 1 than the best complete trial was
    best_first_epoch = max(t.intermediate_values[1] for t in complete)
    assert all(t.intermediate_values[1] < best_first_epoch for t in pruned)


def test_trials_validate_on_the_split_and_never_evaluate_the_test_set(searched):
    _, evaluated = searched
    assert evaluated and set(evaluated) == {100}  # 10% of 1,000 training images; the test set has 10,000


def test_results_and_live_lines(searched, capsys):
    result, _ = searched
    out = result.out
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == list(range(6))
    assert {"state", "val_accuracy", "epochs", "seconds", "conv_1_filter", "dense_1_units", "lr"} <= set(rows[0])
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(float(r["val_accuracy"]) for r in rows if r["state"] == "COMPLETE")
    assert best["config"]["hparams"]["conv_1_filter"] == best["params"]["conv_1_filter"]
    for picture in ("history.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((out / "tune.json").read_text())["settings"]
    assert settings["trials"] == 6 and settings["pruner"] == "hyperband" and settings["config"]["epochs"] == 2


def test_from_tune_reproduces_the_best_trial_and_tests_once(searched, mnist_dir, tmp_path):
    result, _ = searched
    best = json.loads((result.out / "best.json").read_text())
    run = tmp_path / "final"
    assert cli.main(["train", "--from-tune", str(result.out), "--data-dir", str(mnist_dir), "--out", str(run),
                     "--quiet", "--no-report"]) == 0
    with open(run / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2
    assert float(history[-1]["val_accuracy"]) == pytest.approx(best["value"], abs=1e-6)
    config = json.loads((run / "config.json").read_text())
    assert config["hparams"] == {k: v for k, v in best["params"].items() if k != "lr"}
    assert config["lr"] == pytest.approx(best["params"]["lr"])
    assert json.loads((run / "metrics.json").read_text())["num_test"] == 10_000


def test_a_diverging_trial_is_recorded_and_the_search_goes_on(mnist_dir, tmp_path):
    raw = {"model": "seed001", "optimizer": "sgd", "search": {"lr": {"choice": [1e6, 1e7]}}}
    settings = tune.make_settings(raw, {"epochs": 1, "limit_train": 300}, trials=2, pruner="none")
    result = tune.search(settings, tmp_path / "nan", data_dir=mnist_dir, threads=1, progress=False)
    trials = result.study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # both counted: the search ended
    assert all("the loss became" in t.user_attrs["error"] for t in trials) and result.best is None
    with open(tmp_path / "nan" / "trials.csv") as f:
        assert all("the loss became" in row["error"] for row in csv.DictReader(f))


# --- Resume after a kill ------------------------------------------------------------------------------

def kill_while_training(worker: subprocess.Popen, db: Path, number: int, params: int, timeout: float = 60) -> None:
    """SIGKILL the worker while its trial `number` trains: RUNNING in the study file with all its
    `params` sampled. The worker is paused (SIGSTOP) while the file is read, so what the read sees
    is what the kill leaves: no race with a trial that lasts under a second on a fast machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.send_signal(signal.SIGSTOP)
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)) as con:
                row = con.execute("SELECT t.state, (SELECT count(*) FROM trial_params p WHERE p.trial_id = t.trial_id) "
                                  "FROM trials t WHERE t.number = ?", (number,)).fetchone()
        except sqlite3.OperationalError:  # not created yet, or locked by the paused writer
            row = None
        if row and row[0] == "RUNNING" and row[1] == params:
            worker.send_signal(signal.SIGKILL)
            worker.communicate()
            return
        assert row is None or row[0] == "RUNNING", f"trial {number} ended ({row[0]}) before it could be killed"
        worker.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    worker.kill()
    pytest.fail(f"trial {number} never started training within {timeout:.0f} s")


def test_resume_after_a_kill_continues_the_study(mnist_dir, tiny_space, tmp_path):
    out = tmp_path / "killed"
    url = tune.storage_url(out, None)
    worker = start_worker(["--space", str(tiny_space), "--trials", "3", "--pruner", "none", "--out", str(out),
                           *TINY_FLAGS], mnist_dir)
    seen = []
    for line in worker.stdout:  # trials 0 and 1 finished ...
        seen += trial_numbers(line)
        if 1 in seen:
            break
    kill_while_training(worker, out / tune.STUDY_FILE, number=2, params=3)  # ... and kill -9 while trial 2 runs
    before = {t.number: t for t in load(url).get_trials()}
    assert before[2].state == optuna.trial.TrialState.RUNNING  # the kill left it running

    resumed = finish(start_worker(["--resume", str(out)], mnist_dir))
    assert "queued again after a kill: [2]" in resumed
    after = {t.number: t for t in load(url).get_trials()}
    for number in (0, 1):  # kept, not run again
        assert after[number].state == optuna.trial.TrialState.COMPLETE
        assert after[number].params == before[number].params and after[number].value == before[number].value
    assert after[2].state == optuna.trial.TrialState.FAIL
    assert after[3].params == before[2].params  # the killed trial, queued again
    assert min(trial_numbers(resumed)) == 3  # numbering continues
    assert finished_numbers(load(url)) == {0, 1, 3}


# --- Several workers on one study -----------------------------------------------------------------------

def two_workers(args_a: list[str], args_b: list[str], mnist_dir) -> tuple[list[int], list[int]]:
    workers = [start_worker(args, mnist_dir) for args in (args_a, args_b)]
    outputs = [finish(w) for w in workers]
    return trial_numbers(outputs[0]), trial_numbers(outputs[1])


def check_shared(a: list[int], b: list[int], study, trials: int) -> None:
    assert a and b, "both workers ran trials"
    assert not set(a) & set(b), "no trial number ran twice"
    assert len(a) == len(set(a)) and len(b) == len(set(b))
    assert set(a) | set(b) == finished_numbers(study)
    assert len(finished_numbers(study)) == trials


def test_two_workers_share_one_sqlite_study(mnist_dir, tiny_space, tmp_path):
    out = tmp_path / "shared"
    args = ["--space", str(tiny_space), "--trials", "4", "--pruner", "none", "--out", str(out), *TINY_FLAGS]
    a, b = two_workers(args, args, mnist_dir)
    check_shared(a, b, load(tune.storage_url(out, None)), 4)


def pg_binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a loopback port (as the postgres user when we are root:
    PostgreSQL refuses to run as root); stopped and deleted afterwards."""
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.fail("PostgreSQL is not installed: `bash scripts/dev.sh test` installs it (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="mnistlab-pg-"))
    as_user = []
    if os.geteuid() == 0:
        import pwd
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(mnist_dir, tiny_space, tmp_path, postgres_url):
    # Two tune folders, as two machines would have, joined by the storage URL and the study name.
    args = ["--space", str(tiny_space), "--trials", "4", "--pruner", "none", "--storage", postgres_url,
            "--study-name", "shared", *TINY_FLAGS]
    a, b = two_workers([*args, "--out", str(tmp_path / "a")], [*args, "--out", str(tmp_path / "b")], mnist_dir)
    check_shared(a, b, load(postgres_url, "shared"), 4)
    assert (tmp_path / "a" / "best.json").is_file() and (tmp_path / "b" / "best.json").is_file()


def test_joining_a_study_with_other_settings_is_refused(tiny_space, tmp_path, postgres_url):
    first = tune.make_settings(tiny_space, {"epochs": 2}, study_name="other")
    tune._load_or_create_study(first, tune.open_storage(postgres_url))
    with pytest.raises(MnistlabError, match="started with other settings"):
        tune._load_or_create_study(tune.make_settings(tiny_space, {"epochs": 3}, study_name="other"),
                                   tune.open_storage(postgres_url))
