"""Metrics of a trained model on a labelled image set, computed in large inference batches."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data, models


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


@torch.inference_mode()
def predict_logits(net: nn.Module, images_u8: torch.Tensor, batch_size: int = EVAL_BATCH,
                   channels_last: bool = True, precision: str = "fp32") -> torch.Tensor:
    """fp32 logits for uint8 images [N, 28, 28], in eval mode, batch by batch; precision="bf16"
    runs the network under bf16 autocast (validation during bf16 training)."""
    was_training = net.training
    net.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = torch.cat([net(models.to_input(images_u8[i:i + batch_size], channels_last)).float()
                            for i in range(0, len(images_u8), batch_size)])
    net.train(was_training)
    return logits


def evaluate(net: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH,
             channels_last: bool = True, precision: str = "fp32") -> Metrics:
    logits = predict_logits(net, images_u8, batch_size, channels_last, precision)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Metrics(test_loss=loss, test_accuracy=accuracy, num_test=len(labels))


def evaluate_run(run: Path, data_dir: Path | None = None, dataset: str | None = None) -> Metrics:
    """Reload a run folder's model and evaluate it on the test split of its (or another) dataset."""
    net, arch = models.load_model(Path(run))
    net = net.to(memory_format=torch.channels_last)
    test_set = data.load(dataset or arch.dataset, "test", data_dir)
    return evaluate(net, test_set.images, test_set.labels)
