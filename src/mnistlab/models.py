"""The model zoo: every tutorial network, registered by name, built the Keras way.

Each definition reads like the Keras `Sequential` it reproduces. Lazy layers stand in for
Keras's shape inference (`Dense(64)` needs no input size); `build` materialises them with a
28x28 dummy input and then applies Keras's initialisers, so parameter counts and starting
points match what Keras gives for the same model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MnistlabError
from .runfiles import atomic_path, write_json

INPUT_SHAPE = (1, 28, 28)  # channels, height, width: every MNIST-family image


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Sequential]
    description: str
    defaults: dict = field(default_factory=dict)  # hyperparameters the builder takes


MODELS: dict[str, ModelSpec] = {}


def register(description: str, **defaults):
    """Decorator: add a builder to the zoo under its function name."""
    def add(builder):
        MODELS[builder.__name__] = ModelSpec(builder.__name__, builder, description, defaults)
        return builder
    return add


# --- Keras vocabulary, so that definitions read like the originals -------------------------

def Conv2D(filters: int, kernel_size: int, padding: str = "valid") -> nn.Module:
    return nn.LazyConv2d(filters, kernel_size, padding=padding)


def Dense(units: int) -> nn.Module:
    return nn.LazyLinear(units)


def BatchNormalization() -> nn.Module:
    # Keras's moving-average momentum 0.99 is PyTorch's momentum 0.01; Keras's epsilon is 1e-3.
    return nn.LazyBatchNorm2d(eps=1e-3, momentum=0.01)


def BatchNormalization1d() -> nn.Module:
    return nn.LazyBatchNorm1d(eps=1e-3, momentum=0.01)


MaxPool2D, Dropout, Flatten, ReLU = nn.MaxPool2d, nn.Dropout, nn.Flatten, nn.ReLU


# --- The zoo --------------------------------------------------------------------------------

@register("Chollet, Deep Learning with Python: 3 convs (32-64-64), dense 64; 93,322 params")
def seed003(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        Conv2D(32, 3), ReLU(), MaxPool2D(2),
        Conv2D(64, 3), ReLU(), MaxPool2D(2),
        Conv2D(64, 3), ReLU(),
        Flatten(),
        Dense(64), ReLU(),
        Dense(num_classes),  # softmax is folded into the cross-entropy loss
    )


def to_input(images_u8: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], scaled /255 as the Keras tutorials do."""
    x = images_u8.unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --- Building, saving, loading -----------------------------------------------------------------

def keras_init_(net: nn.Module) -> None:
    """Keras defaults: glorot_uniform kernels, zero biases, BatchNorm gamma 1 beta 0."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()


def create_model(name: str, num_classes: int = 10, **hparams) -> nn.Sequential:
    """Build zoo model `name` (with optional hyperparameters), materialised and Keras-initialised."""
    spec = get_spec(name)
    unknown = set(hparams) - set(spec.defaults)
    if unknown:
        raise MnistlabError(f"model {name} has no hyperparameter {', '.join(sorted(unknown))}; "
                            f"it takes: {', '.join(spec.defaults) or 'none'}")
    net = spec.builder(num_classes=num_classes, **{**spec.defaults, **hparams})
    net.eval()  # a batch of one through BatchNorm needs eval mode
    with torch.no_grad():
        net(torch.zeros(1, *INPUT_SHAPE))
    net.train()
    keras_init_(net)
    return net


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise MnistlabError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def count_params(net: nn.Module) -> dict[str, int]:
    """Keras's totals: BatchNorm moving mean/variance count as non-trainable parameters."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    moving = sum(b.numel() for name, b in net.named_buffers() if name.endswith(("running_mean", "running_var")))
    return {"total": trainable + frozen + moving, "trainable": trainable, "non_trainable": frozen + moving}


@dataclass
class Architecture:
    """What is needed to rebuild a saved model by name (stored as model.json beside the weights)."""
    name: str
    hparams: dict
    num_classes: int
    classes: list[str]
    dataset: str


def save_model(net: nn.Module, arch: Architecture, folder: Path) -> None:
    """Weights as safetensors (loading them executes no code) plus model.json; both atomic."""
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(folder / "model.json", asdict(arch))


def load_model(folder: Path) -> tuple[nn.Module, Architecture]:
    folder = Path(folder)
    for needed in ("model.json", "model.safetensors"):
        if not (folder / needed).is_file():
            raise MnistlabError(f"{folder} has no {needed}; point at a run folder written by `mnistlab train`")
    try:
        arch = Architecture(**json.loads((folder / "model.json").read_text()))
        net = create_model(arch.name, arch.num_classes, **arch.hparams)
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as err:  # safetensors' own error type is not importable; any failure here is a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MnistlabError(f"cannot load the model in {folder} ({first}); re-run `mnistlab train` "
                            "to write it again") from err
    net.eval()
    return net, arch
