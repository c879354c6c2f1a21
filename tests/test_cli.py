import json
import os
import signal
import subprocess
import sys
import time

from mnistlab.cli import main

TINY = ["--epochs", "1", "--limit-train", "1000", "--batch-size", "128", "--quiet"]


def test_train_then_evaluate_json(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "seed003", "--optimizer", "rmsprop", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and str(out) in printed
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stored = json.loads((out / "metrics.json").read_text())
    assert result["test_accuracy"] == stored["test_accuracy"] and result["num_test"] == 10_000


def test_finished_run_is_not_overwritten(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["train", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err


def test_user_mistakes_print_one_line_without_traceback(tmp_path, capsys):
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnistlab: error: unknown model 'nope'") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "model.json" in capsys.readouterr().err


def test_datasets_lists_known_sets_and_local_availability(mnist_dir, capsys):
    assert main(["datasets", "--data-dir", str(mnist_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"mnist", "fashion-mnist", "kmnist"} <= set(names)
    mnist_line = lines[names.index("mnist")]
    assert "available" in mnist_line and "not downloaded" not in mnist_line


def test_models_lists_the_zoo_and_summary_prints_keras_totals(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name, count in [("seed000", "1,446,602"), ("seed001", "599,754"), ("seed002", "887,530"),
                        ("seed003", "93,322"), ("seed004", "485,514")]:
        assert any(line.startswith(name) and count in line for line in listing.splitlines())
    assert main(["summary", "seed000"]) == 0
    text = capsys.readouterr().out
    assert "Total params: 1,446,602" in text and "Non-trainable params: 2,304" in text
    assert main(["summary", "seed001", "--hparams", "conv_1_filter=48,dense_1_units=64"]) == 0
    assert "(None, 26, 26, 48)" in capsys.readouterr().out
    assert main(["summary", "nope"]) == 2


def test_recipe_config_file_and_flags_compose(tmp_path, mnist_dir, capsys):
    file = tmp_path / "settings.toml"
    file.write_text("epochs = 4\nlimit-train = 800\nbatch_size = 200\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "seed004", "--config", str(file), "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["model"], config["loss"]) == ("seed004", "seed004", "categorical_crossentropy")
    assert (config["batch_size"], config["limit_train"], config["epochs"]) == (200, 800, 1)


def test_sigterm_saves_and_resume_finishes(tmp_path, mnist_dir):
    """A real process, a real SIGTERM half way through, then `--resume`."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mnistlab", "train", "--model", "seed003", "--limit-train", "4000", "--epochs", "3",
           "--batch-size", "32", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while b"epoch 1 -" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + err).decode()[-500:]
    assert b"resume with: mnistlab train --resume" in err and (out / "resume.pt").is_file()
    assert main(["train", "--resume", str(out), "--epochs", "5"]) == 2  # a run resumes with its own settings
    assert main(["train", "--out", str(out), "--epochs", "1"]) == 2      # nor is it started over by accident
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and not (out / "resume.pt").exists()


def test_ensemble_writes_each_members_report(tmp_path, mnist_dir, capsys):
    out = tmp_path / "ens"
    assert main(["train", "--ensemble", "2", "--recipe", "fast", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 2: test_accuracy" in printed and f"reports: {out}/member-*/report.html" in printed
    for member in ("member-1", "member-2"):
        html = (out / member / "report.html").read_text()
        assert "data:image/png;base64," in html and "Confusion" in html
    figures = json.loads((out / "ensemble.json").read_text())
    assert len(figures["member_accuracies"]) == 2
    assert main(["train", "--ensemble-models", "best,seed002", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "--ensemble-models names the members of an ensemble; add --ensemble N" in capsys.readouterr().err
