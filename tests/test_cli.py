import json

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
