"""Metrics of a trained model on a labelled image set, computed in large inference batches.

`evaluate` is the cheap figure the training loop reports every epoch (loss, accuracy).
`analyse` is the full picture of a finished model from the same logits, in whole-tensor
operations: confusion matrix, per-class precision/recall/F1, their averages, the most confused
pairs, top-2 accuracy and calibration (ECE). `evaluate_run` reloads a run folder and analyses it,
optionally also under test-time augmentation, whose figures are kept apart from the plain ones.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data, models
from .devices import autocast, reuse_freed_memory
from .errors import MnistlabError
from .runfiles import write_json


@dataclass
class Metrics:
    test_loss: float
    test_accuracy: float
    num_test: int

    # The training loop reports validation figures with the same code, under Keras's names.
    @property
    def loss(self) -> float:
        return self.test_loss

    @property
    def accuracy(self) -> float:
        return self.test_accuracy

    def to_dict(self) -> dict:
        return asdict(self)


# Batches of 256 fit the CPU's caches: measured 1.5-3x faster than 1000 on this 2-core CPU.
EVAL_BATCH = 256
ECE_BINS = 15        # Guo et al. 2017, "On Calibration of Modern Neural Networks": M = 15 equal-width bins
MOST_CONFUSED = 10   # pairs listed; the rest of the off-diagonal is in the confusion matrix
# Test-time augmentation views as (down, right) pixel shifts: the image itself and one pixel each way.
# MNIST digits are centred by their centre of mass, so a one-pixel shift is a plausible other centring.
TTA_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


@torch.inference_mode()
def predict_logits(net: nn.Module, images_u8: torch.Tensor, batch_size: int = EVAL_BATCH,
                   channels_last: bool = True, precision: str = "fp32") -> torch.Tensor:
    """fp32 logits for uint8 images [N, 28, 28], in eval mode, batch by batch, on the images' device;
    precision="bf16" or "fp16" runs the network under autocast (validation during such training)."""
    reuse_freed_memory()  # large batches: without it each one faults its activations in again
    was_training = net.training
    net.eval()
    run = models.fused(net)  # the same logits to a rounding; seed003 at batch 1000 1.5-1.7x faster (inference.py)
    with autocast(images_u8.device, precision):
        logits = torch.cat([run(models.to_input(images_u8[i:i + batch_size], channels_last)).float()
                            for i in range(0, len(images_u8), batch_size)])
    net.train(was_training)
    return logits


def evaluate(net: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH,
             channels_last: bool = True, precision: str = "fp32") -> Metrics:
    logits = predict_logits(net, images_u8, batch_size, channels_last, precision)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Metrics(test_loss=loss, test_accuracy=accuracy, num_test=len(labels))


# --- The full analysis -------------------------------------------------------------------------

@dataclass
class ConfusedPair:
    true: str
    predicted: str
    count: int

    def __str__(self) -> str:
        return f"{self.true} -> {self.predicted}: {self.count} times"


@dataclass
class Analysis(Metrics):
    """Everything `mnistlab evaluate` reports; test_accuracy is the top-1 accuracy.

    Precision (recall) of a class never predicted (absent from the labels) is 0, as scikit-learn's
    zero_division=0; so is an F1 whose precision and recall are both 0. Macro averages weigh every
    class equally, weighted averages by support (the class's number of test images)."""
    classes: list[str]
    top2_accuracy: float
    ece: float                        # expected calibration error over ECE_BINS confidence bins
    confusion_matrix: list[list[int]]  # [true class][predicted class]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    most_confused: list[ConfusedPair]  # off-diagonal cells, most frequent first
    # The reliability diagram: per confidence bin ((m-1)/M, m/M], its size, mean confidence, accuracy.
    bin_count: list[int]
    bin_confidence: list[float]
    bin_accuracy: list[float]
    tta: Analysis | None = field(default=None, repr=False)  # the same model under test-time augmentation

    TTA_KEYS = ("test_loss", "test_accuracy", "top2_accuracy", "ece", "macro_f1")

    def to_dict(self) -> dict:
        """The metrics.json keys; TTA's headline figures go under tta_* keys, never the plain ones."""
        out = {k: v for k, v in asdict(self).items() if k != "tta"}
        if self.tta is not None:
            out.update({f"tta_{key}": getattr(self.tta, key) for key in self.TTA_KEYS})
            out["tta_shifts"] = [list(s) for s in TTA_SHIFTS]
        return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def analyse(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Analysis:
    """The full analysis of a model's logits [N, C] on labels [N], from whole-tensor operations."""
    logits, labels = logits.float(), labels.long()
    n, num_classes = logits.shape
    if len(classes) != num_classes:
        raise MnistlabError(f"the model has {num_classes} outputs but {len(classes)} class names; "
                            "evaluate it on a data set with as many classes")
    probs = logits.softmax(1)
    predicted = logits.argmax(1)
    confidence = probs.gather(1, predicted[:, None]).squeeze(1).double()
    correct = (predicted == labels).double()

    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    hits, support, predicted_count = confusion.diag().double(), confusion.sum(1).double(), confusion.sum(0).double()
    precision, recall = _ratio(hits, predicted_count), _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    weights = support / n

    top2 = (logits.topk(min(2, num_classes), 1).indices == labels[:, None]).any(1)

    # ECE (Guo et al. 2017): sum over bins of |B_m|/n * |accuracy(B_m) - confidence(B_m)|.
    inner_edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)  # bin m holds (edge m, edge m+1]
    bin_count = torch.bincount(bins, minlength=ECE_BINS)
    confidence_sum = torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, bins, confidence)
    correct_sum = torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, bins, correct)
    ece = (confidence_sum - correct_sum).abs().sum() / n

    off_diagonal = confusion.clone().fill_diagonal_(0).flatten()
    counts, cells = off_diagonal.sort(descending=True, stable=True)  # ties: by true, then predicted class
    keep = int((counts > 0).sum().clamp(max=MOST_CONFUSED))
    most_confused = [ConfusedPair(classes[cell // num_classes], classes[cell % num_classes], count)
                     for count, cell in zip(counts[:keep].tolist(), cells[:keep].tolist())]

    return Analysis(
        # top-1 accuracy as `evaluate` computes it (a float32 mean), so both give the same number
        test_loss=F.cross_entropy(logits, labels).item(), test_accuracy=(predicted == labels).float().mean().item(),
        num_test=n,
        classes=list(classes), top2_accuracy=top2.double().mean().item(), ece=ece.item(),
        confusion_matrix=confusion.tolist(), precision=precision.tolist(), recall=recall.tolist(),
        f1=f1.tolist(), support=support.long().tolist(),
        macro_precision=precision.mean().item(), macro_recall=recall.mean().item(), macro_f1=f1.mean().item(),
        weighted_precision=(weights * precision).sum().item(), weighted_recall=(weights * recall).sum().item(),
        weighted_f1=(weights * f1).sum().item(), most_confused=most_confused,
        bin_count=bin_count.tolist(), bin_confidence=_ratio(confidence_sum, bin_count.double()).tolist(),
        bin_accuracy=_ratio(correct_sum, bin_count.double()).tolist())


def top_losses(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the (at most) k misclassified images with the highest loss, highest first."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    wrong = logits.argmax(1) != labels
    k = min(k, int(wrong.sum()))
    return losses.masked_fill(~wrong, -torch.inf).topk(k).indices


# --- Test-time augmentation -------------------------------------------------------------------

def shift(images_u8: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """Images [N, H, W] moved by whole pixels, the uncovered edge filled with 0 (the background):
    zero-pad, then slice; torch.roll would wrap the far edge around instead."""
    pad = max(abs(down), abs(right))
    height, width = images_u8.shape[-2:]
    padded = F.pad(images_u8, (pad, pad, pad, pad))
    return padded[:, pad - down:pad - down + height, pad - right:pad - right + width]


def predict_tta(net: nn.Module, images_u8: torch.Tensor, shifts=TTA_SHIFTS) -> torch.Tensor:
    """Logits whose softmax is the mean softmax over the shifted views (log of the mean probability)."""
    probs = sum(predict_logits(net, shift(images_u8, *s)).softmax(1) for s in shifts) / len(shifts)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


# --- Run folders ----------------------------------------------------------------------------------

@dataclass
class RunPredictions:
    net: nn.Module
    arch: models.Architecture
    test_set: data.Dataset
    logits: torch.Tensor  # fp32, [num_test, num_classes]


def predict_run(run: Path, data_dir: Path | None = None, dataset: str | None = None) -> RunPredictions:
    """Reload a run folder's model and compute its logits on the test split of its (or another) dataset."""
    net, arch = models.load_model(Path(run))
    net = net.to(memory_format=torch.channels_last)
    test_set = data.load(dataset or arch.dataset, "test", data_dir)
    return RunPredictions(net, arch, test_set, predict_logits(net, test_set.images))


def store_analysis(run: Path, analysis: Analysis) -> None:
    """Merge the analysis into the run's metrics.json, keeping what training wrote (epochs, train_seconds)
    and earlier TTA figures."""
    path = Path(run) / "metrics.json"
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MnistlabError(f"{path} is not valid JSON ({err}); delete it or re-run `mnistlab train`") from None
    write_json(path, {**stored, **analysis.to_dict()})


def evaluate_run(run: Path, data_dir: Path | None = None, dataset: str | None = None,
                 tta: bool = False) -> Analysis:
    """Reload a run folder's model and analyse it on the test split of its (or another) dataset;
    with tta, also over TTA_SHIFTS (in .tta). On the run's own dataset the figures are merged into
    its metrics.json."""
    run = Path(run)
    predictions = predict_run(run, data_dir, dataset)
    net, arch, test_set = predictions.net, predictions.arch, predictions.test_set
    analysis = analyse(predictions.logits, test_set.labels, arch.classes)
    if tta:
        analysis.tta = analyse(predict_tta(net, test_set.images), test_set.labels, arch.classes)
    if test_set.info.name == arch.dataset:
        store_analysis(run, analysis)
    return analysis


def evaluate_ensemble(runs: list[Path], data_dir: Path | None = None, tta: bool = False) -> dict:
    """The members' mean probability on their test set, and each member's own accuracy (with tta,
    also the mean over the members' TTA probabilities, reported apart)."""
    members = [predict_run(run, data_dir) for run in runs]
    labels, images = members[0].test_set.labels, members[0].test_set.images
    accuracy = lambda probs: float((probs.argmax(1) == labels).float().mean())
    mean = sum(m.logits.softmax(1) for m in members) / len(members)
    figures = {"members": [str(run) for run in runs], "num_test": len(labels),
               "member_accuracies": [accuracy(m.logits) for m in members], "test_accuracy": accuracy(mean)}
    if tta:
        figures["tta_test_accuracy"] = accuracy(sum(predict_tta(m.net, images).softmax(1) for m in members))
    return figures


def format_analysis(analysis: Analysis) -> str:
    """The readable table `mnistlab evaluate` prints: overall figures, per class, most confused pairs."""
    a = analysis
    width = max(12, *map(len, a.classes))
    lines = [f"test_loss {a.test_loss:.4f} - test_accuracy {a.test_accuracy:.4f} ({a.num_test} images)",
             f"top-1 accuracy {a.test_accuracy:.4f} - top-2 accuracy {a.top2_accuracy:.4f} - "
             f"ECE ({ECE_BINS} bins) {a.ece:.4f}"]
    if a.tta is not None:
        t = a.tta
        lines.append(f"with TTA ({len(TTA_SHIFTS)} views: the image and 1-pixel shifts): test_loss {t.test_loss:.4f}"
                     f" - test_accuracy {t.test_accuracy:.4f} - top-2 accuracy {t.top2_accuracy:.4f}"
                     f" - ECE {t.ece:.4f} - macro F1 {t.macro_f1:.4f}")
    lines += ["", f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, p, r, f, s in zip(a.classes, a.precision, a.recall, a.f1, a.support):
        lines.append(f"{name:<{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {s:>8}")
    lines += ["",
              f"{'macro avg':<{width}} {a.macro_precision:>9.4f} {a.macro_recall:>9.4f} {a.macro_f1:>9.4f} "
              f"{a.num_test:>8}",
              f"{'weighted avg':<{width}} {a.weighted_precision:>9.4f} {a.weighted_recall:>9.4f} "
              f"{a.weighted_f1:>9.4f} {a.num_test:>8}",
              "", "most confused (true -> predicted):"]
    lines += [f"  {pair}" for pair in a.most_confused] or ["  none: every test image is right"]
    return "\n".join(lines)
