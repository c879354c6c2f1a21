"""Pictures and a self-contained HTML report of a run: what the model learned, shown.

Every plot is a small function of plain data (arrays, lists) and an output path, so tests can
check it on hand-made inputs; `write_report` gathers a run's data once (one pass of the test set
through the model) and calls them. Plots are drawn after training or by `mnistlab report`, never
during training. Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas: no
display is needed and the global backend of a caller (a notebook, say) is left alone. Figure sizes
are multiples of 1/4 inch at DPI 100, so every PNG has an exact, known pixel size.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from . import data, evaluate, models
from .augment import Augmentation, augment
from .callbacks import Callback
from .errors import MnistlabError
from .runfiles import atomic_path, atomic_write_text

DPI = 100
WRONG = "#d62728"    # matplotlib's red: wrong predictions
TOP_LOSSES = 24      # three rows of eight
GRID_IMAGES = 32     # four rows of eight
GRID_COLUMNS = 8
MAX_CHANNELS = 16    # feature maps shown per conv layer
GRID_SEED = 0        # the prediction grid's random images are the same on every report
AUGMENTED_VIEWS = 7  # random warps shown beside each original
AUGMENTED_CLASSES = 10  # classes (rows) in that picture, at most


# --- Plot helpers ---------------------------------------------------------------------------------

def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _mosaic(tiles: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """Tiles [n, h, w] laid out in rows of `columns`, `gap` NaN pixels between them (drawn as a gap)."""
    n, h, w = tiles.shape
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def _class_ticks(ax, classes: list[str], axis: str = "x") -> None:
    """Class names as ticks; long ones (Fashion-MNIST's "T-shirt/top") slanted so they never overlap."""
    slant = max(map(len, classes)) > 3
    if axis == "x":
        ax.set_xticks(range(len(classes)), classes, rotation=35 if slant else 0,
                      ha="right" if slant else "center", rotation_mode="anchor")
    else:
        ax.set_yticks(range(len(classes)), classes)


def _image_grid(images: np.ndarray, titles: list[str], wrong: list[bool], suptitle: str, path: Path) -> Path:
    """Images in rows of GRID_COLUMNS, each titled; wrong ones in a red frame with a red title."""
    rows = max(1, math.ceil(len(images) / GRID_COLUMNS))
    height = 0.5 + 1.75 * rows
    # Fixed margins instead of the layout engine: half the time for a grid of 32 small axes; a cell
    # of 1.75 inches leaves room for a two-line title above each image.
    fig = _figure(12, height, layout=None)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1 / height, top=1 - 0.85 / height, wspace=0.15,
                        hspace=0.45)
    axes = fig.subplots(rows, GRID_COLUMNS, squeeze=False).flatten()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, image, title, bad in zip(axes, images, titles, wrong):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9, color=WRONG if bad else "black")
        if bad:
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set(color=WRONG, linewidth=2.5)
    if len(images) == 0:
        axes[0].text(0, 0.5, "none", fontsize=12)
    fig.suptitle(suptitle)
    return _save(fig, path)


def _pair_title(*parts: str) -> str:
    """"4 / 9 / 0.97" on one line; long class names break onto a second line."""
    text = " / ".join(parts)
    return text if len(text) <= 16 else " / ".join(parts[:-1]) + "\n" + parts[-1]


# --- The plots -----------------------------------------------------------------------------------

def plot_learning_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation, and the learning rate. 1200 x 375 px.
    history: rows of history.csv as numbers (NaN where a run had no validation data)."""
    fig = _figure(12, 3.75)
    axes = fig.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [row[key] for row in history], "o-", label="train")
        val = [row[f"val_{key}"] for row in history]
        if not all(math.isnan(v) for v in val):
            ax.plot(epochs, val, "o-", label="validation")
        ax.set(title=key, xlabel="epoch")
        ax.legend()
    axes[2].plot(epochs, [row["lr"] for row in history], "o-", color="C2")
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_confusion_matrix(matrix, classes: list[str], path: Path) -> Path:
    """Counts, rows the true class and columns the predicted one; the colour is log-scaled so that a
    handful of errors shows beside a thousand right answers; empty cells stay blank. 750 x 650 px."""
    matrix = np.asarray(matrix)
    fig = _figure(7.5, 6.5)
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1, vmax=max(2, matrix.max()))
    image = ax.imshow(np.ma.masked_equal(matrix, 0), cmap="Blues", norm=norm)
    size = 9 if len(classes) <= 10 else 7
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=size,
                    color="white" if norm(count) > 0.6 else "black")
    _class_ticks(ax, classes, "x")
    _class_ticks(ax, classes, "y")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"confusion matrix: {matrix.trace():,} of {matrix.sum():,} right")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images (log scale)")
    return _save(fig, path)


def plot_top_losses(images, true, predicted, probability, classes: list[str], path: Path) -> Path:
    """Misclassified images titled "true / predicted / probability of the prediction", highest loss
    first. 1200 x (50 + 175 * rows) px, rows of eight."""
    titles = [_pair_title(classes[t], classes[p], f"{q:.2f}") for t, p, q in zip(true, predicted, probability)]
    return _image_grid(np.asarray(images), titles, [False] * len(titles),
                       "highest-loss errors: true / predicted / probability of the prediction", path)


def plot_predictions(images, true, predicted, confidence, classes: list[str], path: Path) -> Path:
    """Images titled with the predicted class and its probability; wrong ones red, with the true
    class. 1200 x (50 + 175 * rows) px, rows of eight."""
    titles = [f"{classes[p]} ({c:.0%})" + ("" if t == p else f"\ntrue {classes[t]}")
              for t, p, c in zip(true, predicted, confidence)]
    wrong = [t != p for t, p in zip(true, predicted)]
    return _image_grid(np.asarray(images), titles, wrong,
                       f"predicted class (probability): {len(titles) - sum(wrong)} of {len(titles)} right,"
                       " wrong ones in red", path)


def plot_per_class(precision, recall, f1, classes: list[str], path: Path) -> Path:
    """Precision, recall and F1 bars per class. The y axis starts just below the lowest value (said
    on the axis), else 99% bars would all look alike. 1000 x 425 px."""
    fig = _figure(10, 4.25)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    for offset, (name, values) in zip((-0.27, 0, 0.27), (("precision", precision), ("recall", recall),
                                                          ("F1", f1))):
        ax.bar(x + offset, values, width=0.27, label=name)
    low = min(min(precision), min(recall), min(f1))
    bottom = max(0.0, math.floor((low - 0.005) * 20) / 20)  # a multiple of 0.05 below the lowest bar
    ax.set_ylim(bottom, 1 + (1 - bottom) * 0.02)
    _class_ticks(ax, classes, "x")
    ax.set(ylabel=f"score (axis from {bottom:.2f})", title="per-class precision, recall and F1")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def plot_reliability(bin_confidence, bin_accuracy, bin_count, path: Path) -> Path:
    """Reliability diagram (Guo et al. 2017): accuracy against confidence per equal-width bin, the gap
    to the diagonal shaded; beside it how many images fall in each bin. 1000 x 425 px."""
    conf, acc, count = (np.asarray(v, dtype=float) for v in (bin_confidence, bin_accuracy, bin_count))
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    centres, width, filled = (edges[:-1] + edges[1:]) / 2, 1 / bins, count > 0
    ece = float((count * np.abs(acc - conf)).sum() / max(count.sum(), 1))
    fig = _figure(10, 4.25)
    left, right = fig.subplots(1, 2)
    left.bar(centres[filled], acc[filled], width=width, edgecolor="black", linewidth=0.5, label="accuracy")
    gap = np.abs(acc - conf)
    left.bar(centres[filled], gap[filled], bottom=np.minimum(acc, conf)[filled], width=width, facecolor="none",
             hatch="///", edgecolor=WRONG, linewidth=0.8, label="gap to the bin's mean confidence")
    left.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    left.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (probability of the predicted class)",
             ylabel="accuracy", title=f"reliability diagram: ECE {ece:.4f} ({bins} bins)")
    # below the axes: any corner of the plot may hold a bar
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    right.bar(centres, count, width=width, edgecolor="black", linewidth=0.5)
    right.set(xlim=(0, 1), xlabel="confidence", ylabel="images (log scale)", title="images per bin")
    if count.max() > 0:
        right.set_yscale("log")
        right.set_ylim(bottom=0.5)  # a bin of one image stays visible
    return _save(fig, path)


def plot_filters(weights, path: Path) -> Path:
    """A conv layer's kernels [out, in, kh, kw] (first input channel: the only one of a grayscale
    image), each scaled by its own largest |weight|: red excites, blue inhibits. 800 x (75 + 75 *
    rows) px, rows of eight."""
    kernels = np.asarray(weights, dtype=float)[:, 0]
    kernels = kernels / np.maximum(np.abs(kernels).max(axis=(1, 2), keepdims=True), 1e-12)
    rows = math.ceil(len(kernels) / GRID_COLUMNS)
    fig = _figure(8, 0.75 + 0.75 * rows)
    ax = fig.add_subplot()
    image = ax.imshow(_mosaic(kernels, GRID_COLUMNS), cmap=colormaps["RdBu_r"].with_extremes(bad="white"),
                      vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    k = kernels.shape[-1]
    ax.set_title(f"first-layer filters: {len(kernels)} kernels of {k}x{k}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="weight / largest |weight| of the kernel")
    return _save(fig, path)


def plot_feature_maps(image, maps: list[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """One image and what each conv layer makes of it: up to MAX_CHANNELS channels per layer, each
    scaled to its own maximum (bright = strong activation). 1200 x (50 + 200 * layers) px."""
    fig = _figure(12, 0.5 + 2 * max(1, len(maps)))
    axes = fig.subplots(max(1, len(maps)), 2, width_ratios=[1, 5], squeeze=False)
    for ax in axes.flatten():
        ax.set_axis_off()
    axes[0, 0].imshow(image, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=10)
    for (ax, (name, channels)) in zip(axes[:, 1], maps):
        shown = np.asarray(channels[:MAX_CHANNELS], dtype=float)
        shown = shown / np.maximum(shown.max(axis=(1, 2), keepdims=True), 1e-12)
        deskew = name == "deskew"  # an image, drawn like the input, not a layer's channels
        cmap = colormaps["gray_r" if deskew else "magma"].with_extremes(bad="white")
        ax.imshow(_mosaic(shown, MAX_CHANNELS // 2), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        c, h, w = np.shape(channels)
        ax.set_title(f"{name}: the image the convolutions see, sheared upright" if deskew else
                     f"{name}: {c} channels of {h}x{w} after ReLU, the first {len(shown)} shown", fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def plot_samples(samples, classes: list[str], title: str, path: Path) -> Path:
    """A row of images per class, its name at the left. samples: uint8 [classes, per_class, 28, 28].
    (1.75 + 0.5 * per_class) x (0.75 + 0.5 * classes) inches at 100 dpi."""
    samples = np.asarray(samples)
    num_classes, per_class, h, w = samples.shape
    fig = _figure(1.75 + 0.5 * per_class, 0.75 + 0.5 * num_classes)
    ax = fig.add_subplot()
    ax.imshow(_mosaic(samples.reshape(-1, h, w).astype(float), per_class, gap=3),
              cmap=colormaps["gray_r"].with_extremes(bad="white"), vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([r * (h + 3) + h / 2 - 0.5 for r in range(num_classes)], classes)
    ax.set_xticks([])
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(title)
    return _save(fig, path)


def plot_compare(histories: dict[str, list[dict]], path: Path) -> Path:
    """Learning curves of several runs overlaid: a colour per run, validation solid, train dashed.
    1200 x 450 px."""
    fig = _figure(12, 4.5)
    axes = fig.subplots(1, 2)
    for colour, (name, history) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in history]
        for ax, key in zip(axes, ("loss", "accuracy")):
            val = [row[f"val_{key}"] for row in history]
            if not all(math.isnan(v) for v in val):
                ax.plot(epochs, val, "-", color=f"C{colour}", label=f"{name} (validation)")
            ax.plot(epochs, [row[key] for row in history], "--", color=f"C{colour}", alpha=0.6,
                    label=f"{name} (train)")
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set(title=key, xlabel="epoch", yscale="log" if key == "loss" else "linear")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# --- What the model computes ------------------------------------------------------------------

def first_conv(net: nn.Module) -> nn.Conv2d:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise MnistlabError("the model has no Conv2d layer, so it has no filters to show; pick a CNN from the zoo")
    return conv


def first_filters(net: nn.Sequential) -> np.ndarray:
    """The first convolution's kernels as they lie on the image, [out, 1, kh, kw]. After a
    space-to-depth layer the kernels see r x r pixel blocks as channels: depth-to-space puts
    those pixels back, a 3x3 kernel on 4 channels being a 6x6 kernel on the image (stride 2)."""
    weight = first_conv(net).weight.detach().float()
    if isinstance(net[0], nn.PixelUnshuffle):
        weight = torch.nn.functional.pixel_shuffle(weight, net[0].downscale_factor)
    return weight.numpy()


@torch.inference_mode()
def feature_maps(net: nn.Sequential, image_u8: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One image [28, 28] through the convolutional part of the network: the output [C, H, W] after
    each Conv2d and its ReLU, named as Keras's summary names the layers (conv2d, conv2d_1, ...), and
    after a Deskew layer (as "deskew")."""
    was_training = net.training
    net.eval()
    x, maps, convs, pending = models.to_input(image_u8[None], channels_last=False), [], 0, None
    for layer in net:
        if isinstance(layer, nn.Flatten):
            break
        x = layer(x)
        if isinstance(layer, models.Deskew):
            maps.append(("deskew", x[0].float().contiguous()))
        elif isinstance(layer, nn.Conv2d):
            pending, convs = f"conv2d{f'_{convs}' if convs else ''}", convs + 1
        elif isinstance(layer, nn.ReLU) and pending:
            maps.append((pending, x[0].float().contiguous()))
            pending = None
    net.train(was_training)
    return maps


# --- History, samples, comparison ----------------------------------------------------------------

def read_history(run: Path) -> list[dict]:
    """history.csv as numbers: epoch an int, the rest floats, NaN where empty (no validation)."""
    path = Path(run) / "history.csv"
    if not path.is_file():
        raise MnistlabError(f"{run} has no history.csv; point at a run folder written by `mnistlab train`")
    with open(path, newline="") as f:
        return [{key: int(value) if key == "epoch" else float(value) if value != "" else math.nan
                 for key, value in row.items()} for row in csv.DictReader(f)]


def samples_per_class(dataset: data.Dataset, per_class: int) -> torch.Tensor:
    """The first `per_class` images of each class: uint8 [classes, per_class, 28, 28]."""
    if not 1 <= per_class <= 100:
        raise MnistlabError(f"per_class {per_class} is out of range; pick 1 to 100")
    return torch.stack([dataset.images[dataset.labels == c][:per_class] for c in range(len(dataset.info.classes))])


def augmented_views(images_u8: torch.Tensor, aug: Augmentation, views: int = AUGMENTED_VIEWS,
                    seed: int = GRID_SEED) -> torch.Tensor:
    """Each image, then `views` random warps of it drawn as training draws them: uint8 [n, 1 + views, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    x = models.to_input(images_u8, channels_last=False)
    warped = torch.stack([x, *(augment(x, aug, generator) for _ in range(views))], dim=1)[:, :, 0]
    return warped.mul(255).round().to(torch.uint8)


def show_dataset(name: str, out: Path, per_class: int = 10, data_dir: Path | None = None) -> Path:
    """`mnistlab datasets show`: a grid of the first training images of every class."""
    dataset = data.load(name, "train", data_dir)
    return plot_samples(samples_per_class(dataset, per_class).numpy(), list(dataset.info.classes),
                        f"{name}: the first {per_class} training images of each class", Path(out))


@dataclass
class RunSummary:
    run: str
    model: str
    params: int
    epochs: int
    train_seconds: float
    test_accuracy: float
    macro_f1: float
    ece: float


def summarise_run(run: Path, data_dir: Path | None = None) -> RunSummary:
    """A run's headline figures; a run not analysed yet is evaluated first (and its metrics.json updated)."""
    run = Path(run)
    net, arch = models.load_model(run)
    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if not {"macro_f1", "ece"} <= set(metrics):
        metrics = {**metrics, **evaluate.evaluate_run(run, data_dir).to_dict()}
    history = read_history(run) if (run / "history.csv").is_file() else []
    return RunSummary(str(run), arch.name, models.count_params(net)["total"], metrics.get("epochs", len(history)),
                      metrics.get("train_seconds", sum(row["seconds"] for row in history)),
                      metrics["test_accuracy"], metrics["macro_f1"], metrics["ece"])


def compare(runs: list[Path], out: Path | None = None, data_dir: Path | None = None) -> list[RunSummary]:
    """Headline figures of several runs; with `out`, their learning curves overlaid in one PNG."""
    summaries = [summarise_run(run, data_dir) for run in runs]
    if out:
        plot_compare({str(run): read_history(run) for run in runs}, out)
    return summaries


def format_comparison(summaries: list[RunSummary]) -> str:
    header = ("run", "model", "params", "epochs", "wall time", "test acc", "macro F1", "ECE")
    rows = [(s.run, s.model, f"{s.params:,}", str(s.epochs), f"{s.train_seconds:.1f}s", f"{s.test_accuracy:.4f}",
             f"{s.macro_f1:.4f}", f"{s.ece:.4f}") for s in summaries]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in (header, *rows))


# --- The report -----------------------------------------------------------------------------------

@dataclass
class Picture:
    file: str      # the PNG's name in the run folder
    title: str
    caption: str


def draw_pictures(run: Path, predictions: evaluate.RunPredictions, analysis: evaluate.Analysis,
                  history: list[dict], config: dict) -> list[Picture]:
    """Every picture of the report, written into the run folder."""
    net, classes = predictions.net, analysis.classes
    images, labels, logits = predictions.test_set.images, predictions.test_set.labels, predictions.logits
    predicted = logits.argmax(1)
    confidence = logits.softmax(1).gather(1, predicted[:, None]).squeeze(1)
    pictures = []

    def add(file: str, title: str, caption: str) -> Path:
        pictures.append(Picture(file, title, caption))
        return run / file

    if history:
        plot_learning_curves(history, add("learning_curves.png", "Learning curves",
                             "Loss and accuracy per epoch on the training data (as logged while training, "
                             "dropout active) and on the validation data; the learning rate at each epoch's end."))
    aug = Augmentation.of(config)
    if aug.active:
        firsts = samples_per_class(predictions.test_set, 1)[:AUGMENTED_CLASSES, 0]
        settings = ", ".join(f"{name} {value}" for name, value in aug.settings().items())
        plot_samples(augmented_views(firsts, aug).numpy(), classes[:len(firsts)],
                     f"the image, then {AUGMENTED_VIEWS} random training warps", add(
                         "augmented.png", "Augmentation",
                         f"The first test image of each class, then {AUGMENTED_VIEWS} random warps of it drawn "
                         f"the way training drew them ({settings}): what the model saw instead of the plain images."))
    plot_confusion_matrix(analysis.confusion_matrix, classes, add(
        "confusion_matrix.png", "Confusion matrix",
        "Test images by true class (rows) and predicted class (columns); the diagonal is right."))
    plot_per_class(analysis.precision, analysis.recall, analysis.f1, classes, add(
        "per_class.png", "Per-class precision, recall and F1",
        "Precision: of the images predicted as the class, the share that are; recall: of the class's "
        "images, the share found; F1: their harmonic mean."))
    plot_reliability(analysis.bin_confidence, analysis.bin_accuracy, analysis.bin_count, add(
        "reliability.png", "Calibration",
        f"Accuracy against confidence in {evaluate.ECE_BINS} equal-width bins; a calibrated model's "
        "bars follow the diagonal. ECE is the bar gaps averaged, weighted by the images per bin."))
    worst = evaluate.top_losses(logits, labels, TOP_LOSSES)
    plot_top_losses(images[worst].numpy(), labels[worst].tolist(), predicted[worst].tolist(),
                    confidence[worst].tolist(), classes, add(
                        "top_losses.png", "Top losses",
                        f"The {len(worst)} misclassified test images the model was most sure about "
                        "(highest cross-entropy loss), titled true / predicted / probability of the prediction."))
    shown = torch.randperm(len(labels), generator=torch.Generator().manual_seed(GRID_SEED))[:GRID_IMAGES]
    plot_predictions(images[shown].numpy(), labels[shown].tolist(), predicted[shown].tolist(),
                     confidence[shown].tolist(), classes, add(
                         "predictions.png", "Predictions",
                         f"{len(shown)} random test images (seed {GRID_SEED}) with the predicted class and "
                         "its probability; wrong predictions in red with the true class."))
    plot_filters(first_filters(net), add(
        "filters.png", "First-layer filters",
        "The kernels the first convolution slides over the image; each responds to the pattern its red "
        "(positive) weights draw: edges and strokes in some direction."))
    example = images[0]
    plot_feature_maps(example.numpy(), [(name, m.numpy()) for name, m in feature_maps(net, example)],
                      f"test image 0 (true {classes[labels[0]]}, predicted {classes[predicted[0]]} "
                      f"{confidence[0].item():.0%})",
                      add("feature_maps.png", "Feature maps",
                          "One test image through each convolutional layer: every channel is a filter's "
                          "response map; deeper layers are smaller and respond to larger parts."))
    return pictures


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return "" if math.isnan(value) else f"{value:.4g}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(config: dict, prefix: str = "") -> list[list]:
    rows = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([prefix + key, json.dumps(value) if isinstance(value, (dict, list)) else value])
    return rows


def _img(run: Path, picture: Picture) -> str:
    encoded = base64.b64encode((run / picture.file).read_bytes()).decode()
    return (f'<figure id="{picture.file}"><img src="data:image/png;base64,{encoded}" '
            f'alt="{html.escape(picture.title)}"><figcaption>{html.escape(picture.caption)} '
            f"<code>{picture.file}</code></figcaption></figure>")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th{background:#f2f2f2}td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}.sub{color:#555}"""


def render_html(run: Path, config: dict, history: list[dict], metrics: dict, analysis: evaluate.Analysis,
                pictures: list[Picture], seconds: float) -> str:
    a, by_file = analysis, {p.file: p for p in pictures}

    def section(title: str, *parts: str) -> str:
        return f"<h2>{html.escape(title)}</h2>" + "".join(parts)

    def picture(file: str) -> str:
        return _img(run, by_file[file]) if file in by_file else ""

    overall = [["test accuracy (top-1)", a.test_accuracy], ["top-2 accuracy", a.top2_accuracy],
               ["test loss", a.test_loss], [f"ECE ({evaluate.ECE_BINS} bins)", a.ece],
               ["macro precision / recall / F1", f"{a.macro_precision:.4f} / {a.macro_recall:.4f} / {a.macro_f1:.4f}"],
               ["weighted precision / recall / F1",
                f"{a.weighted_precision:.4f} / {a.weighted_recall:.4f} / {a.weighted_f1:.4f}"],
               ["test images", a.num_test], ["epochs", metrics.get("epochs", len(history))],
               ["training time (s)", metrics.get("train_seconds", "")]]
    overall += [[f"with TTA: {key.replace('_', ' ')}", metrics[f"tta_{key}"]]
                for key in evaluate.Analysis.TTA_KEYS if f"tta_{key}" in metrics]
    per_class = [[name, p, r, f, s] for name, p, r, f, s in zip(a.classes, a.precision, a.recall, a.f1, a.support)]
    per_class += [["macro avg", a.macro_precision, a.macro_recall, a.macro_f1, a.num_test],
                  ["weighted avg", a.weighted_precision, a.weighted_recall, a.weighted_f1, a.num_test]]
    confused = "".join(f"<li>{html.escape(str(pair))}</li>" for pair in a.most_confused) or "<li>none</li>"
    history_rows = [[row.get(k, "") for k in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                                               "seconds")] for row in history]
    files = "".join(f'<li><a href="#{p.file}"><code>{p.file}</code></a>: {html.escape(p.title)}</li>' for p in pictures)
    model, dataset = config.get("model", "?"), config.get("dataset", "?")
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>mnistlab report: {html.escape(str(run))}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>mnistlab report: <code>{html.escape(str(run))}</code></h1>",
        f"<p class='sub'>model {html.escape(str(model))} on {html.escape(str(dataset))}, "
        f"{a.test_accuracy:.2%} test accuracy; written {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.1f} s "
        "by <code>mnistlab report</code>. Pictures are embedded: this file stands alone.</p>",
        section("Summary", _table(["metric", "value"], overall)),
        section("Learning curves", picture("learning_curves.png"),
                _table(["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"], history_rows)),
        section("Augmentation", picture("augmented.png")) if "augmented.png" in by_file else "",
        section("Confusion matrix", picture("confusion_matrix.png"),
                "<p>Most confused pairs (true -&gt; predicted):</p><ul>", confused, "</ul>"),
        section("Per class", _table(["class", "precision", "recall", "F1", "support"], per_class),
                "<p>Precision and recall are 0 for a class never predicted or absent from the test set "
                "(scikit-learn's zero_division=0).</p>", picture("per_class.png")),
        section("Calibration", picture("reliability.png")),
        section("Top losses", picture("top_losses.png")),
        section("Predictions", picture("predictions.png")),
        section("Inside the network", picture("filters.png"), picture("feature_maps.png")),
        section("Configuration", _table(["setting", "value"], _flatten(config))),
        section("Pictures", f"<p>Also written beside this report in <code>{html.escape(str(run))}</code>:</p>"
                f"<ul>{files}</ul>"),
        "</body></html>\n"])


def write_report(run: Path, data_dir: Path | None = None) -> Path:
    """Analyse a run on its test set (updating metrics.json), draw every picture into the run folder and
    write report.html there: self-contained, the pictures embedded as data URIs. Returns its path."""
    start = time.perf_counter()
    run = Path(run)
    predictions = evaluate.predict_run(run, data_dir)
    analysis = evaluate.analyse(predictions.logits, predictions.test_set.labels, predictions.arch.classes)
    evaluate.store_analysis(run, analysis)
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    history = read_history(run) if (run / "history.csv").is_file() else []
    pictures = draw_pictures(run, predictions, analysis, history, config)
    path = run / "report.html"
    atomic_write_text(path, render_html(run, config, history, metrics, analysis, pictures,
                                        time.perf_counter() - start))
    return path


# --- TensorBoard ----------------------------------------------------------------------------------

class TensorBoard(Callback):
    """Keras's TensorBoard callback, epoch scalars only: each log as `loss/train`, `loss/validation`,
    `accuracy/...`, and `learning_rate`, stepped by epoch (counted from 1 as in history.csv)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the separate tensorboard package
            raise MnistlabError("TensorBoard logging needs the tensorboard package; install it "
                                "(pip install tensorboard) or leave --tensorboard off") from None
        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(self.log_dir)

    def on_epoch_end(self, epoch, logs, loop):
        for key, value in logs.items():
            split = "validation" if key.startswith("val_") else "train"
            self.writer.add_scalar(f"{key.removeprefix('val_')}/{split}", value, epoch + 1)
        self.writer.add_scalar("learning_rate", loop.lr, epoch + 1)
        self.writer.flush()

    def on_train_end(self, loop):
        self.writer.close()
