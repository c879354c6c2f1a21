import json
import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mnistlab import models, report
from mnistlab.cli import main
from mnistlab.errors import MnistlabError

TINY = ["--model", "seed003", "--epochs", "1", "--limit-train", "1000", "--threads", "1", "--quiet"]
PICTURES = ["learning_curves.png", "confusion_matrix.png", "per_class.png", "reliability.png", "top_losses.png",
            "predictions.png", "filters.png", "feature_maps.png"]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def size(path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG that decodes."""
    image = imread(path)
    return image.shape[1], image.shape[0]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, for checking what they draw (still saved to disk)."""
    saved, real_save = [], report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig) or real_save(fig, path))
    return saved


def digits(n: int, seed: int = 0) -> np.ndarray:
    return torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()


# --- Each plot, on hand-made inputs: decodes, has the documented size, draws the right things --------

def test_learning_curves(tmp_path):
    history = [{"epoch": e, "loss": 1 / e, "accuracy": 1 - 0.1 / e, "val_loss": math.nan, "val_accuracy": math.nan,
                "lr": 1e-3, "seconds": 1.0} for e in (1, 2, 3)]
    assert size(report.plot_learning_curves(history, tmp_path / "c.png")) == (1200, 375)


def test_confusion_matrix_shows_every_nonzero_count_in_its_cell(tmp_path, figures):
    matrix = [[5, 0, 1], [2, 7, 0], [0, 3, 9]]
    assert size(report.plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "m.png")) == (750, 650)
    ax = figures[0].axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "5", (0, 2): "1", (1, 0): "2", (1, 1): "7", (2, 1): "3", (2, 2): "9"}  # (row, col)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true" and "21 of 27 right" in ax.get_title()


def test_long_class_names_are_slanted_and_fit_in_the_picture(tmp_path, figures):
    matrix = np.eye(10, dtype=int) * 100
    report.plot_confusion_matrix(matrix, FASHION, tmp_path / "m.png")
    report.plot_per_class([0.9] * 10, [0.9] * 10, [0.9] * 10, FASHION, tmp_path / "b.png")
    for figure in figures:
        labels = figure.axes[0].get_xticklabels()
        assert [t.get_text() for t in labels] == FASHION and labels[0].get_rotation() > 0
        figure.canvas.draw()
        width, height = figure.canvas.get_width_height()
        for box in (t.get_window_extent() for t in labels):
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height  # not cut off


def test_top_losses_titles_say_true_predicted_probability(tmp_path, figures):
    path = report.plot_top_losses(digits(10), [4, 2, 7] * 3 + [1], [9, 7, 1] * 3 + [7], [0.97] * 9 + [0.5],
                                  list("0123456789"), tmp_path / "t.png")
    assert size(path) == (1200, 400)  # two rows of eight
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert titles[:3] == ["4 / 9 / 0.97", "2 / 7 / 0.97", "7 / 1 / 0.97"] and titles[-1] == "1 / 7 / 0.50"
    report.plot_top_losses(digits(1), [9], [0], [0.9], FASHION, tmp_path / "f.png")
    assert figures[1].axes[0].get_title() == "Ankle boot / T-shirt/top\n0.90"  # long names: two lines


def test_prediction_grid_marks_the_wrong_ones_red(tmp_path, figures):
    true, predicted = list(range(10)) * 3 + [0, 1], list(range(10)) * 3 + [6, 1]
    path = report.plot_predictions(digits(32), true, predicted, [0.999] * 30 + [0.61, 0.999], list("0123456789"),
                                   tmp_path / "p.png")
    assert size(path) == (1200, 750)  # four rows of eight
    axes = [ax for ax in figures[0].axes if ax.get_title()]
    red = [ax.get_title() for ax in axes if ax.title.get_color() == report.WRONG]
    assert red == ["6 (61%)\ntrue 0"] and axes[0].get_title() == "0 (100%)"
    assert "31 of 32 right" in figures[0].get_suptitle()


def test_per_class_bars_have_the_given_heights(tmp_path, figures):
    precision, recall, f1 = [1.0, 0.5, 0.0], [0.8, 0.4, 0.0], [0.9, 0.45, 0.0]
    path = report.plot_per_class(precision, recall, f1, ["a", "b", "c"], tmp_path / "b.png")
    assert size(path) == (1000, 425)
    ax = figures[0].axes[0]
    heights = [round(bar.get_height(), 6) for bar in ax.patches]
    assert heights == precision + recall + f1 and ax.get_ylim()[0] == 0  # a 0 bar: the axis starts at 0


def test_reliability_diagram(tmp_path, figures):
    conf, acc, count = [0.0] * 15, [0.0] * 15, [0] * 15
    conf[9], acc[9], count[9] = 0.625, 0.5, 2
    conf[14], acc[14], count[14] = 0.95, 1.0, 6
    assert size(report.plot_reliability(conf, acc, count, tmp_path / "r.png")) == (1000, 425)
    ece = (2 * 0.125 + 6 * 0.05) / 8
    assert f"ECE {ece:.4f}" in figures[0].axes[0].get_title()


def test_filters_and_feature_maps_of_a_real_model(tmp_path):
    net = models.create_model("seed003")
    assert size(report.plot_filters(report.first_conv(net).weight.detach().numpy(), tmp_path / "f.png")) == (800, 375)
    maps = report.feature_maps(net, torch.from_numpy(digits(1)[0]))
    path = report.plot_feature_maps(digits(1)[0], [(n, m.numpy()) for n, m in maps], "one image", tmp_path / "m.png")
    assert size(path) == (1200, 650)  # three conv layers


def test_first_filters_after_space_to_depth_are_the_kernels_on_the_image():
    net = models.create_model("fast").eval()
    kernels = torch.from_numpy(report.first_filters(net))
    assert kernels.shape == (32, 1, 6, 6)  # 3x3 on 4 channels of 14x14 = 6x6 with stride 2 on 28x28
    images, conv = torch.rand(3, 1, 28, 28), report.first_conv(net)
    with torch.no_grad():
        torch.testing.assert_close(conv(net[0](images)), torch.nn.functional.conv2d(images, kernels, conv.bias, stride=2))


def test_feature_maps_are_each_conv_after_its_relu():
    net = models.create_model("seed003").eval()
    image = torch.from_numpy(digits(1)[0])
    maps = report.feature_maps(net, image)
    assert [(name, tuple(m.shape)) for name, m in maps] == [("conv2d", (32, 26, 26)), ("conv2d_1", (64, 11, 11)),
                                                           ("conv2d_2", (64, 3, 3))]
    x = models.to_input(image[None], channels_last=False)
    with torch.no_grad():
        assert torch.allclose(maps[0][1], net[:2](x)[0]) and torch.allclose(maps[2][1], net[:8](x)[0])
    assert len(report.feature_maps(models.create_model("seed000"), image)) == 4  # Conv, ReLU, BN: after the ReLU


def test_feature_maps_show_what_a_deskew_layer_hands_the_convolutions():
    net = models.create_model("best_deskew").eval()
    image = torch.from_numpy(digits(1)[0])
    maps = report.feature_maps(net, image)
    assert [name for name, _ in maps] == ["deskew"] + [f"conv2d{f'_{i}' if i else ''}" for i in range(7)]
    with torch.no_grad():
        assert torch.equal(maps[0][1], models.Deskew()(models.to_input(image[None], channels_last=False))[0])


def test_samples_per_class_and_their_grid(tmp_path, mnist_dir):
    from mnistlab import data
    train = data.load("mnist", "train", mnist_dir)
    samples = report.samples_per_class(train, 4)
    first_threes = train.images[train.labels == 3][:4]
    assert samples.shape == (10, 4, 28, 28) and samples[3].equal(first_threes)
    path = report.plot_samples(samples[:3].numpy(), ["a", "b", "c"], "title", tmp_path / "s.png")
    assert size(path) == (375, 225)
    with pytest.raises(MnistlabError, match="pick 1 to 100"):
        report.samples_per_class(train, 0)


def test_compare_curves(tmp_path):
    history = [{"epoch": e, "loss": 1 / e, "accuracy": 1 - 0.1 / e, "val_loss": 1.2 / e, "val_accuracy": 1 - 0.2 / e,
                "lr": 1e-3, "seconds": 1.0} for e in (1, 2)]
    assert size(report.plot_compare({"runs/a": history, "runs/b": history[:1]}, tmp_path / "c.png")) == (1200, 450)


def test_tensorboard_logs_scalars_or_names_the_missing_package(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(MnistlabError, match="needs the tensorboard package"):
            report.TensorBoard(tmp_path / "tb")
        return
    callback = report.TensorBoard(tmp_path / "tb")
    loop = type("Loop", (), {"lr": 1e-3})()
    callback.on_epoch_end(0, {"loss": 0.5, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.92}, loop)
    callback.on_train_end(loop)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_tags_each_log_by_split(monkeypatch, tmp_path):
    import sys
    import types
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    callback = report.TensorBoard(tmp_path / "tb")
    callback.on_epoch_end(2, {"loss": 0.5, "val_accuracy": 0.9}, type("Loop", (), {"lr": 1e-3})())
    callback.on_train_end(None)
    assert calls == [("init", str(tmp_path / "tb")), ("loss/train", 0.5, 3), ("accuracy/validation", 0.9, 3),
                     ("learning_rate", 1e-3, 3), ("close",)]
    assert "writer" not in callback.state_dict()  # the resumable checkpoint holds plain values only


# --- A tiny real run, through the CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """`mnistlab train` on 1000 images: writes the report by default."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_a_self_contained_report(trained, capsys):
    html = (trained / "report.html").read_text()
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", html)
    assert len(images) == len(PICTURES) and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http" not in " ".join(re.findall(r"(?:src|href)=\"([^\"]*)\"", html))  # nothing fetched from outside
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"epochs", "train_seconds", "confusion_matrix", "macro_f1", "ece"} <= set(metrics)
    assert f"{metrics['test_accuracy']:.4g}" in html and f"{metrics['macro_f1']:.4g}" in html
    for name in PICTURES:
        assert name in html and imread(trained / name).ndim == 3
    assert "<td>batch_size</td>" in html and "<th>val_accuracy</th>" in html  # config and history tables


def test_no_report_flag_and_report_command(trained, tmp_path, capsys):
    out = tmp_path / "bare"
    assert main(["train", *TINY, "--out", str(out), "--no-report"]) == 0
    assert "report:" not in capsys.readouterr().out and not (out / "report.html").exists()
    assert not list(out.glob("*.png"))
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html") and (out / "report.html").is_file()


def test_compare_prints_both_runs_and_writes_curves(trained, tmp_path, capsys):
    curves = tmp_path / "curves.png"
    other = tmp_path / "other"
    assert main(["train", *TINY, "--out", str(other), "--no-report", "--optimizer", "adam"]) == 0
    capsys.readouterr()
    assert main(["compare", str(trained), str(other), "--out", str(curves)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "params"]
    assert lines[1].startswith(str(trained)) and lines[2].startswith(str(other)) and "93,322" in lines[2]
    assert size(curves) == (1200, 450)
    assert "macro_f1" in json.loads((other / "metrics.json").read_text())  # analysed on the way


def test_datasets_show_writes_a_png_and_listing_still_works(mnist_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["datasets", "show", "mnist", "--out", str(grid), "--per-class", "6"]) == 0
    assert capsys.readouterr().out.strip() == str(grid) and size(grid) == (475, 575)
    assert main(["datasets"]) == 0
    assert "mnist" in capsys.readouterr().out


def test_bad_run_folders_are_one_line_errors(tmp_path, capsys):
    for argv in (["report", str(tmp_path / "missing")], ["compare", str(tmp_path / "missing"), str(tmp_path)],
                 ["datasets", "show"], ["datasets", "show", "nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mnistlab: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tensorboard_logs_every_epoch_of_a_real_fit(mnist_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mnistlab.train import TrainConfig, fit
    fit(TrainConfig(model="seed003", epochs=2, limit_train=600, batch_size=100, tensorboard=True, threads=1),
        out=tmp_path, data_dir=mnist_dir, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation", "accuracy/validation", "learning_rate"} <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]


def test_augmented_views_start_with_the_image_and_warp_the_rest():
    from mnistlab.augment import Augmentation
    images = torch.from_numpy(digits(3))
    views = report.augmented_views(images, Augmentation(rotation_range=20, elastic_alpha=34, elastic_sigma=6), 4)
    assert views.shape == (3, 5, 28, 28) and views.dtype == torch.uint8
    assert views[:, 0].equal(images)
    assert all(not views[i, k].equal(images[i]) for i in range(3) for k in range(1, 5))
    assert views.equal(report.augmented_views(images, Augmentation(rotation_range=20, elastic_alpha=34, elastic_sigma=6), 4))


def test_an_augmented_run_shows_its_augmentation_in_the_report(trained, tmp_path):
    out = tmp_path / "aug"
    assert main(["train", *TINY, "--out", str(out), "--rotation-range", "15", "--elastic-alpha", "30"]) == 0
    html = (out / "report.html").read_text()
    assert "<h2>Augmentation</h2>" in html and "(rotation_range 15.0, elastic_alpha 30.0, elastic_sigma 4.0)" in html
    assert size(out / "augmented.png") == (575, 575)  # 10 classes, the image and 7 warps each
    assert "<h2>Augmentation</h2>" not in (trained / "report.html").read_text()  # none without augmentation
