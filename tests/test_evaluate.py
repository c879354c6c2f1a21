import json
import math

import pytest
import torch
import torch.nn.functional as F

from mnistlab import models
from mnistlab.cli import main
from mnistlab.evaluate import (ECE_BINS, Analysis, Metrics, analyse, evaluate, evaluate_run, format_analysis,
                               predict_logits, predict_tta, shift, store_analysis, top_losses)
from mnistlab.train import TrainConfig, fit

# A hand-computed case: 3 classes, 8 images; each row is (true class, probabilities). Confidences avoid
# the ECE bin edges (multiples of 1/15) so that the binning below is unambiguous.
CASE = [(0, [0.90, 0.05, 0.05]),   # right, confidence 0.90 -> bin 13
        (0, [0.62, 0.28, 0.10]),   # right, 0.62 -> bin 9
        (0, [0.30, 0.50, 0.20]),   # a -> b, 0.50 -> bin 7; true class second: top-2 right
        (1, [0.09, 0.82, 0.09]),   # right, 0.82 -> bin 12
        (1, [0.05, 0.25, 0.70]),   # b -> c, 0.70 -> bin 10; top-2 right
        (1, [0.27, 0.10, 0.63]),   # b -> c, 0.63 -> bin 9; true class last: top-2 wrong
        (2, [0.03, 0.02, 0.95]),   # right, 0.95 -> bin 14
        (2, [0.45, 0.20, 0.35])]   # c -> a, 0.45 -> bin 6; top-2 right
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def case() -> Analysis:
    labels = torch.tensor([t for t, _ in CASE])
    logits = torch.tensor([p for _, p in CASE]).log()  # softmax(log p) = p
    return analyse(logits, labels, CLASSES)


def test_confusion_matrix_and_per_class_figures_by_hand(case):
    assert case.confusion_matrix == [[2, 1, 0], [0, 1, 2], [1, 0, 1]]
    assert case.support == [3, 3, 2]
    assert case.precision == pytest.approx([2 / 3, 1 / 2, 1 / 3])   # columns: 2/3, 1/2, 1/3
    assert case.recall == pytest.approx([2 / 3, 1 / 3, 1 / 2])      # rows: 2/3, 1/3, 1/2
    assert case.f1 == pytest.approx([2 / 3, 2 / 5, 2 / 5])          # 2PR/(P+R)
    assert case.macro_precision == pytest.approx(1 / 2)
    assert case.macro_recall == pytest.approx(1 / 2)
    assert case.macro_f1 == pytest.approx((2 / 3 + 2 / 5 + 2 / 5) / 3)
    assert case.weighted_precision == pytest.approx((3 * 2 / 3 + 3 * 1 / 2 + 2 * 1 / 3) / 8)  # 25/48
    assert case.weighted_recall == pytest.approx(case.test_accuracy) == pytest.approx(0.5)
    assert case.weighted_f1 == pytest.approx((3 * 2 / 3 + 3 * 2 / 5 + 2 * 2 / 5) / 8)


def test_accuracy_loss_top2_and_most_confused_by_hand(case):
    assert case.test_accuracy == pytest.approx(4 / 8) and case.num_test == 8
    assert case.top2_accuracy == pytest.approx(7 / 8)
    p_true = [0.90, 0.62, 0.30, 0.82, 0.25, 0.10, 0.95, 0.35]
    assert case.test_loss == pytest.approx(-sum(map(math.log, p_true)) / 8, rel=1e-5)
    assert [str(pair) for pair in case.most_confused] == ["b -> c: 2 times", "a -> b: 1 times", "c -> a: 1 times"]


def test_ece_with_15_bins_by_hand(case):
    # One image per bin except bin 9 (0.62 right and 0.63 wrong: accuracy 0.5, confidence 0.625).
    singles = abs(1 - 0.90) + abs(0 - 0.50) + abs(1 - 0.82) + abs(0 - 0.70) + abs(1 - 0.95) + abs(0 - 0.45)
    assert case.ece == pytest.approx(singles / 8 + 2 / 8 * abs(0.5 - 0.625), rel=1e-5)  # 0.27875
    expected_counts = [0] * ECE_BINS
    for index in (13, 9, 7, 12, 10, 9, 14, 6):
        expected_counts[index] += 1
    assert case.bin_count == expected_counts
    assert case.bin_accuracy[9] == 0.5 and case.bin_confidence[9] == pytest.approx(0.625, rel=1e-6)
    assert case.bin_accuracy[13] == 1 and case.bin_accuracy[7] == 0 and case.bin_confidence[0] == 0


def test_never_predicted_and_absent_classes_score_zero_not_nan():
    # Class c is neither in the labels nor predicted; class b is in the labels but never predicted.
    labels = torch.tensor([0, 0, 1])
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])
    a = analyse(logits, labels, CLASSES)
    assert a.precision == pytest.approx([2 / 3, 0, 0]) and a.recall == pytest.approx([1, 0, 0])
    assert a.f1 == pytest.approx([0.8, 0, 0]) and a.macro_f1 == pytest.approx(0.8 / 3)
    assert a.most_confused[0].true == "b" and a.most_confused[0].predicted == "a"


def test_a_perfectly_sure_right_model_is_perfectly_calibrated():
    labels = torch.arange(10).repeat(5)
    a = analyse(F.one_hot(labels, 10).float() * 100, labels, list("0123456789"))
    assert a.test_accuracy == 1 and a.ece == pytest.approx(0, abs=1e-12) and a.most_confused == []
    assert a.bin_count[-1] == 50 and "none: every test image is right" in format_analysis(a)


def test_class_names_must_match_the_outputs():
    from mnistlab.errors import MnistlabError
    with pytest.raises(MnistlabError, match="3 outputs but 2 class names"):
        analyse(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), ["a", "b"])


def test_top_losses_are_the_highest_loss_errors_brute_force():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (400,), generator=generator)
    errors = [(F.cross_entropy(logits[i:i + 1], labels[i:i + 1]).item(), i) for i in range(400)
              if logits[i].argmax().item() != labels[i].item()]
    expected = [i for _, i in sorted(errors, reverse=True)]
    assert top_losses(logits, labels, 24).tolist() == expected[:24]
    assert top_losses(logits, labels, 10_000).tolist() == expected  # at most every error
    right = F.one_hot(labels, 10).float()
    assert top_losses(right, labels, 5).tolist() == []


def test_shift_moves_whole_pixels_and_fills_with_background():
    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 3, 3)
    assert shift(image, 0, 0).equal(image)
    assert shift(image, 1, 0)[0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]   # down, no wrap-around
    assert shift(image, 0, -1)[0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]  # left
    assert shift(image, -1, 1)[0].tolist() == [[0, 4, 5], [0, 7, 8], [0, 0, 0]]


def test_tta_averages_probabilities_over_the_shifted_views():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    shifts = ((0, 0), (1, 0), (0, -1))
    expected = sum(net(shift(images, *s).float().div(255).flatten(1)).softmax(1) for s in shifts) / 3
    got = predict_tta(net, images, shifts).softmax(1)
    assert torch.allclose(got, expected.detach(), atol=1e-6)


def test_to_dict_keeps_tta_apart_and_store_merges(case, tmp_path):
    with_tta = Analysis(**{**vars(case), "tta": analyse(torch.eye(3)[[0, 1, 2, 0]] * 9, torch.tensor([0, 1, 2, 0]),
                                                         CLASSES)})
    d = with_tta.to_dict()
    assert d["test_accuracy"] == case.test_accuracy == 0.5 and d["tta_test_accuracy"] == 1.0
    assert "tta" not in d and {"tta_test_loss", "tta_ece", "tta_macro_f1", "tta_shifts"} <= set(d)
    (tmp_path / "metrics.json").write_text(json.dumps({"test_accuracy": 0.1, "epochs": 3, "train_seconds": 9.5}))
    store_analysis(tmp_path, with_tta)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["epochs"] == 3 and stored["train_seconds"] == 9.5 and stored["test_accuracy"] == 0.5
    assert stored["confusion_matrix"] == case.confusion_matrix and stored["tta_test_accuracy"] == 1.0
    json.dumps(case.to_dict())  # plain JSON, nothing torch-typed


def test_evaluate_keeps_its_cheap_interface():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    m = evaluate(net, torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(5, dtype=torch.long))
    assert type(m) is Metrics and m.loss == m.test_loss and m.accuracy == m.test_accuracy and m.num_test == 5
    assert issubclass(Analysis, Metrics)  # an Analysis goes wherever Metrics did


# --- A tiny real run ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    fit(TrainConfig(model="seed003", epochs=1, limit_train=1000, threads=1), out=out, data_dir=mnist_dir,
        progress=False)
    return out


def test_evaluate_run_analyses_the_real_test_set_and_stores_it(tiny_run, mnist_dir):
    trained = json.loads((tiny_run / "metrics.json").read_text())
    a = evaluate_run(tiny_run, data_dir=mnist_dir)
    assert a.test_accuracy == trained["test_accuracy"] and a.num_test == 10_000
    assert sum(map(sum, a.confusion_matrix)) == 10_000 and sum(a.support) == 10_000
    assert a.support == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST's test set
    assert sum(row[i] for i, row in enumerate(a.confusion_matrix)) == round(a.test_accuracy * 10_000)
    assert a.top2_accuracy >= a.test_accuracy and 0 <= a.ece <= 1 and a.tta is None
    stored = json.loads((tiny_run / "metrics.json").read_text())
    assert stored["epochs"] == 1 and stored["train_seconds"] == trained["train_seconds"]
    assert stored["macro_f1"] == a.macro_f1 and not any(k.startswith("tta_") for k in stored)


def test_cli_evaluate_json_has_the_analysis_keys(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"test_loss", "test_accuracy", "num_test", "confusion_matrix", "precision", "recall", "f1", "support",
            "macro_f1", "weighted_f1", "most_confused", "top2_accuracy", "ece"} <= set(result)
    assert len(result["confusion_matrix"]) == 10 and "tta_test_accuracy" not in result


def test_cli_evaluate_table_and_tta_reported_apart(tiny_run, capsys):
    plain = json.loads((tiny_run / "metrics.json").read_text()) if (tiny_run / "metrics.json").is_file() else {}
    assert main(["evaluate", str(tiny_run), "--tta"]) == 0
    text = capsys.readouterr().out
    assert "with TTA (5 views" in text and "macro avg" in text and "weighted avg" in text
    assert "most confused (true -> predicted):" in text and " times" in text
    assert f"test_accuracy {plain['test_accuracy']:.4f}" in text.splitlines()[0]  # the plain figure stays plain
    stored = json.loads((tiny_run / "metrics.json").read_text())
    assert stored["test_accuracy"] == plain["test_accuracy"] and 0 < stored["tta_test_accuracy"] <= 1


def test_cli_evaluate_bad_run_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnistlab: error:") and "model.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text("{not json")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"junk")
    assert main(["evaluate", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_predictions_run_the_fused_net_with_the_numbers_of_the_model_as_written_to_a_rounding(seed):
    """The fused net's first layer (kernels.ConvPoolReLU) computes in fp32 even under bf16 autocast, where
    the model as written rounds the images and weights to bf16 first: fp32 logits match to a rounding
    (1.1e-7 to 1.3e-7 measured), bf16 ones are no farther from fp32 than the model's own bf16 ones."""
    torch.manual_seed(seed)
    net = models.create_model("seed003").to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        exact = net.eval()(models.to_input(images)).float()  # ReLU before each pooling, ATen's pooling
        with torch.autocast("cpu", torch.bfloat16):
            as_written_bf16 = net.eval()(models.to_input(images)).float()
    fp32 = predict_logits(net, images, batch_size=128, precision="fp32")
    bf16 = predict_logits(net, images, batch_size=128, precision="bf16")
    assert (fp32 - exact).abs().max().item() < 1e-5

    def error(logits):
        return ((logits - exact).norm() / exact.norm()).item()
    assert 0 < error(bf16) < 1.1 * error(as_written_bf16)  # measured: 0.95-1.0x (seeds 0-2)
