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
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import kernels
from .errors import MnistlabError
from .runfiles import atomic_path, write_json

INPUT_SHAPE = (1, 28, 28)  # channels, height, width: every MNIST-family image


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Sequential]
    description: str
    defaults: dict = field(default_factory=dict)  # hyperparameters the builder takes
    space: dict = field(default_factory=dict)     # allowed values per hyperparameter, where limited


MODELS: dict[str, ModelSpec] = {}


def register(description: str, space: dict | None = None, **defaults):
    """Decorator: add a builder to the zoo under its function name."""
    def add(builder):
        MODELS[builder.__name__] = ModelSpec(builder.__name__, builder, description, defaults, space or {})
        return builder
    return add


# --- Keras vocabulary, so that definitions read like the originals -------------------------

def Conv2D(filters: int, kernel_size: int, padding: str = "valid", strides: int = 1) -> nn.Module:
    # Keras's "same" with a stride pads so the output is ceil(input / stride); PyTorch's "same"
    # refuses strides, so strided convolutions pad kernel_size // 2 (equal for odd kernels, even input).
    if strides > 1 and padding == "same":
        return nn.LazyConv2d(filters, kernel_size, stride=strides, padding=kernel_size // 2)
    return nn.LazyConv2d(filters, kernel_size, stride=strides, padding=padding)


def Dense(units: int) -> nn.Module:
    return nn.LazyLinear(units)


def BatchNormalization() -> nn.Module:
    # Keras's moving-average momentum 0.99 is PyTorch's momentum 0.01; Keras's epsilon is 1e-3.
    return nn.LazyBatchNorm2d(eps=1e-3, momentum=0.01)


def BatchNormalization1d() -> nn.Module:
    return nn.LazyBatchNorm1d(eps=1e-3, momentum=0.01)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper random source on a CPU. nn.Dropout draws one float per element
    (`bernoulli_`), which here costs more than the rest of the layer several times over; this draws
    one 64-bit integer per four elements and keeps an element when its 16 bits fall below the keep
    probability (exact to 1/65536), then scales by 1 / (1 - p) as nn.Dropout does. Same generator
    (torch.manual_seed seeds it); in eval mode, on a GPU or in place it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or self.p == 0.0 or self.p == 1.0 or x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, self.training, self.inplace)
        return x * self.noise(x)

    @torch.jit.unused  # training only: TorchScript exports (eval mode) never reach it
    def noise(self, x):  # unannotated: TorchScript cannot resolve the annotations of an unused method
        """0 or 1 / (1 - p) per element of x, in x's dtype and memory layout."""
        keep = 1 - self.p
        bits = torch.randint(-2**63, 2**63 - 1, (-(-x.numel() // 4),)).view(torch.int16)[:x.numel()]
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape
            bits = bits.view(n, h, w, c).permute(0, 3, 1, 2)  # x's layout, so the product keeps it
        else:
            bits = bits.view(x.shape)
        return (bits < round(keep * 65536) - 32768).to(x.dtype).mul_(1 / keep)


class Deskew(nn.Module):
    """Straightens slanted digits, the classic MNIST preprocessing, as a layer (so training, evaluation
    and serving all apply it): each image is sheared along its rows, about its centre of mass, by
    minus its slant, the covariance of ink row and column over the variance of the row (clamped to
    +-1). The centre of mass stays where it was, so shifts from augmentation survive. No weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        ink = x.float().sum(1)  # [n, h, w], non-negative: the images are in [0, 1]
        rows = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=x.device)  # grid_sample units
        cols = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=x.device)
        mass = ink.sum((1, 2)).clamp_min(1e-6)
        row_mass, col_mass = ink.sum(2), ink.sum(1)  # [n, h], [n, w]
        mean_row = (row_mass * rows).sum(1) / mass
        mean_col = (col_mass * cols).sum(1) / mass
        var_row = (row_mass * (rows - mean_row[:, None]) ** 2).sum(1) / mass
        cov = (ink * (rows - mean_row[:, None])[:, :, None] * (cols - mean_col[:, None])[:, None, :]).sum((1, 2)) / mass
        slant = (cov / var_row.clamp_min(1e-6)).clamp(-1, 1)
        one, zero = torch.ones_like(slant), torch.zeros_like(slant)
        theta = torch.stack([torch.stack([one, slant, -slant * mean_row], 1),  # output (col, row) -> input col
                             torch.stack([zero, one, zero], 1)], 1)             # ... -> input row: the same
        grid = nn.functional.affine_grid(theta, [n, x.shape[1], height, width], align_corners=False)
        return torch.empty_like(x).copy_(nn.functional.grid_sample(x.float(), grid, align_corners=False))


MaxPool2D, Flatten, ReLU = nn.MaxPool2d, nn.Flatten, nn.ReLU
SpaceToDepth = nn.PixelUnshuffle  # TensorFlow's tf.nn.space_to_depth (channel order aside)


# --- The zoo --------------------------------------------------------------------------------
# Each docstring names the tutorial; the layers are the tutorial's, in its order.

@dataclass(frozen=True)
class Interval:
    """A half-open range of allowed floats, low <= x < high (a dropout rate)."""
    low: float
    high: float

    def __contains__(self, value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value < self.high

    def __str__(self) -> str:
        return f"{self.low} <= x < {self.high}"


RATE = Interval(0.0, 1.0)
# Dropout rates as hyperparameters (defaults: the tutorial's), so a search can tune them.
DROPOUT_SPACE = {"conv_dropout": RATE, "dense_dropout": RATE}


@register("deep CNN with BatchNorm: 2x Conv 64, 2x Conv 128, Dense 512-256 (seed000 tutorial)",
          space=DROPOUT_SPACE, conv_dropout=0.25, dense_dropout=0.5)
def seed000(num_classes: int = 10, conv_dropout=0.25, dense_dropout=0.5) -> nn.Sequential:
    """Two conv-BN blocks, then a dense head regularised with BatchNorm and dropout."""
    return nn.Sequential(
        Conv2D(64, 3), ReLU(), BatchNormalization(),
        Conv2D(64, 3), ReLU(), BatchNormalization(),
        MaxPool2D(2), Dropout(conv_dropout),
        Conv2D(128, 3), ReLU(), BatchNormalization(),
        Conv2D(128, 3), ReLU(), BatchNormalization(),
        MaxPool2D(2), Dropout(conv_dropout),
        Flatten(),
        Dense(512), ReLU(), BatchNormalization1d(), Dropout(dense_dropout),
        Dense(256), ReLU(), BatchNormalization1d(), Dropout(dense_dropout),
        Dense(num_classes),
    )


# The Keras Tuner tutorial's search space (its hyperparameter names); defaults are the smallest.
SEED001_SPACE = {
    "conv_1_filter": range(32, 129, 16), "conv_1_kernel": (3, 5),
    "conv_2_filter": range(32, 65, 16), "conv_2_kernel": (3, 5),
    "dense_1_units": range(32, 129, 16),
}


@register("Keras Tuner Fashion-MNIST CNN: Conv(f1,k1), Conv(f2,k2), Dense(u), built from hyperparameters",
          space=SEED001_SPACE, conv_1_filter=32, conv_1_kernel=3, conv_2_filter=32, conv_2_kernel=3, dense_1_units=32)
def seed001(num_classes: int = 10, conv_1_filter=32, conv_1_kernel=3, conv_2_filter=32, conv_2_kernel=3,
            dense_1_units=32) -> nn.Sequential:
    """Built from the tuner's hyperparameters; Adam's learning rate (1e-2 or 1e-3) is in the recipe."""
    return nn.Sequential(
        Conv2D(conv_1_filter, conv_1_kernel), ReLU(),
        Conv2D(conv_2_filter, conv_2_kernel), ReLU(),
        Flatten(),
        Dense(dense_1_units), ReLU(),
        Dense(num_classes),
    )


@register("Kaggle digit recognizer CNN (Ghouzam): 2x Conv 32 5x5, 2x Conv 64 3x3, Dense 256",
          space=DROPOUT_SPACE, conv_dropout=0.25, dense_dropout=0.5)
def seed002(num_classes: int = 10, conv_dropout=0.25, dense_dropout=0.5) -> nn.Sequential:
    """Yassine Ghouzam's "Introduction to CNN Keras" (Kaggle digit recognizer)."""
    return nn.Sequential(
        Conv2D(32, 5, padding="same"), ReLU(),
        Conv2D(32, 5, padding="same"), ReLU(),
        MaxPool2D(2), Dropout(conv_dropout),
        Conv2D(64, 3, padding="same"), ReLU(),
        Conv2D(64, 3, padding="same"), ReLU(),
        MaxPool2D(2, stride=2), Dropout(conv_dropout),
        Flatten(),
        Dense(256), ReLU(), Dropout(dense_dropout),
        Dense(num_classes),
    )


@register("Chollet, Deep Learning with Python: Conv 32-64-64, Dense 64 (the default)")
def seed003(num_classes: int = 10) -> nn.Sequential:
    """Chollet, Deep Learning with Python (2nd ed.), chapter 8: the MNIST convnet."""
    return nn.Sequential(
        Conv2D(32, 3), ReLU(), MaxPool2D(2),
        Conv2D(64, 3), ReLU(), MaxPool2D(2),
        Conv2D(64, 3), ReLU(),
        Flatten(),
        Dense(64), ReLU(),
        Dense(num_classes),  # softmax is folded into the cross-entropy loss
    )


@register("two-block CNN: Conv 64, Conv 128, Dropout .33, Dense 128 (seed004 tutorial)",
          space={"dropout": RATE}, dropout=0.33)
def seed004(num_classes: int = 10, dropout=0.33) -> nn.Sequential:
    """The seed004 tutorial names 64 and 128 filters, 3x3 kernels, max pooling, 33% dropout and a
    dense head, without a full listing; this reading puts one conv per block, the dropout after the
    second pool, and a 128-unit ReLU layer before the classifier."""
    return nn.Sequential(
        Conv2D(64, 3), ReLU(), MaxPool2D(2),
        Conv2D(128, 3), ReLU(), MaxPool2D(2),
        Dropout(dropout),
        Flatten(),
        Dense(128), ReLU(),
        Dense(num_classes),
    )


# --- mnistlab's own recipes' models: chosen for speed to a target, and for the best accuracy ------

def ConvBN(filters: int, kernel_size: int, padding: str = "valid", strides: int = 1) -> list[nn.Module]:
    """Conv, BatchNorm (PyTorch's momentum 0.1: statistics that keep up with one-epoch training), ReLU."""
    return [Conv2D(filters, kernel_size, padding, strides), nn.LazyBatchNorm2d(), ReLU()]


@register("mnistlab's small CNN for speed: space-to-depth input, then Conv 32-48-64 with BatchNorm")
def fast(num_classes: int = 10) -> nn.Sequential:
    """Space-to-depth first (each 2x2 block of pixels becomes 4 channels: 28x28x1 -> 14x14x4, no pixel
    lost, no weights), so every convolution works on a quarter of the positions; the first pools
    before its BatchNorm and ReLU, a quarter of their work; BatchNorm after each convolution lets one
    epoch at a high learning rate be enough; no dense hidden layer."""
    return nn.Sequential(
        SpaceToDepth(2),
        Conv2D(32, 3), MaxPool2D(2), nn.LazyBatchNorm2d(), ReLU(),
        *ConvBN(48, 3),
        *ConvBN(64, 3),
        Flatten(),
        Dense(num_classes),
    )


@register("mnistlab's deep CNN for the best accuracy: 3x Conv 32, 3x Conv 64 (stride-2 5x5 instead of pooling), Conv 128 4x4",
          space={"dropout": RATE}, dropout=0.4)
def best(num_classes: int = 10, dropout=0.4) -> nn.Sequential:
    """Deeper than the tutorials, downsampling with strided 5x5 convolutions, after the ensembles that
    top Kaggle's digit recognizer (C. Deotte's 32C3-32C3-32C5S2-64C3-64C3-64C5S2-128C4 with BatchNorm
    and dropout 0.4)."""
    return nn.Sequential(
        *ConvBN(32, 3), *ConvBN(32, 3), *ConvBN(32, 5, "same", strides=2), Dropout(dropout),
        *ConvBN(64, 3), *ConvBN(64, 3), *ConvBN(64, 5, "same", strides=2), Dropout(dropout),
        *ConvBN(128, 4),
        Flatten(), Dropout(dropout),
        Dense(num_classes),
    )


@register("best's layers on straightened digits: a Deskew layer, then best (tried as an ensemble member)",
          space={"dropout": RATE}, dropout=0.4)
def best_deskew(num_classes: int = 10, dropout=0.4) -> nn.Sequential:
    """`best` after `Deskew`: slant no longer varies between inputs, so it errs on other digits than `best`
    does; after Ciresan et al.'s multi-column nets, whose columns differed by their inputs' normalisation."""
    return nn.Sequential(Deskew(), *best(num_classes, dropout))


class FlattenLinear(nn.Module):
    """A Flatten and the Linear after it (shared: same parameters) that read a channels_last input in place:
    the weight's columns are taken in the input's (height, width, channel) order, where the Flatten would copy
    the input to (channel, height, width) order first. The same terms, summed in another order. Other inputs
    go through the two as written."""

    def __init__(self, flatten: nn.Flatten, linear: nn.Linear):
        super().__init__()
        self.flatten, self.linear = flatten, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or (self.flatten.start_dim, self.flatten.end_dim) != (1, -1) or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last) or x[0].numel() != self.linear.in_features):
            return self.linear(self.flatten(x))
        n, c, h, w = x.shape
        weight, bias = self.linear.weight, self.linear.bias
        permuted = lambda: weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, h * w * c)
        # in evaluation the permuted weight is kept while the weight is unchanged (a copy: 55 us of one image's 390)
        in_hwc = permuted() if kernels.grad_wanted(x, weight, bias) else kernels.kept(self, weight, (c, h, w), permuted)
        return F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), in_hwc, bias)


class Fused(nn.Sequential):
    """models.fused's network: its layers in turn, but in evaluation a first convolution with its pooling and
    the Winograd convolutions after it run as one native call (kernels.chain_forward: blocks of images
    through all of them, in the cores' caches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, i = list(self), 0
        while i < len(layers):
            count, y = kernels.chain_forward(layers[i:], x)
            x, i = (y, i + count) if count else (layers[i](x), i + 1)
        return x


def fused(net: nn.Module) -> nn.Module:
    """The network that training steps and evaluation run through: the same function and gradients,
    faster. Each ReLU that a max pooling follows moves after the pooling (ReLU is monotone, so it
    commutes with max): the ReLU and its backward run on a quarter of the positions (seed003 trains
    10-18% faster). Each 2x2 pooling, with the ReLU now after it, becomes one `kernels.MaxPoolReLU`:
    a native kernel that skips ATen's zeroing pass, bit for bit the same numbers. A first convolution
    (one input channel, 3x3 or 5x5; or fast's 3x3 after a SpaceToDepth(2)) and the pooling after it become
    one `kernels.ConvPoolReLU` (seed003, seed004, fast): one native pass each way, in fp32, the same to a
    rounding (seed003's step 1.09-1.18x faster, its evaluation 1.23-1.40x; fast's step 1.07-1.11x). A
    BatchNorm with a ReLU just before or after it becomes one `kernels.BatchNormReLU` (seed000, fast,
    best; in fp32 training two native passes each way, the steps 1.01-1.08x faster). Every other plain
    convolution becomes a `kernels.PatchMatmulConv`: in fp32, a 3x3 one's weight gradient is a native
    kernel's (on an AVX2 CPU the step 1.02-1.19x faster); otherwise, where its output is small (seed003's
    third, 3x3), one matmul (seed003's step 1.02-1.07x faster); where its output is small, in fp32, its
    input gradient is one matmul and a native col2im (the step 1.04-1.06x faster); in fp32, a 3x3 one with
    channels in 8s and 16s runs forward, and from a 4x4 output up its input gradient, by a native
    Winograd F(2x2, 3x3) (the steps 1.15-1.22x faster; the forward by F(3x3, 3x3) where that needs at most
    3/4 of the products: seed003's third, the 24x24 ones); the same to a rounding. Such a convolution with a
    pooling after it (seed003's and seed004's second) becomes one `kernels.WinogradPoolReLU`: each Winograd
    tile is a pooling window, so one pass pools and skips the tiles the pooling drops, as do the gradients
    (the same values; seed003's step 1.14-1.15x faster, seed004's 1.17-1.18x, evaluation 1.33x), by
    F(4x4, 3x3) tiles where they fit (another rounding; evaluation a further 1.14x, 1.24x for seed004). In
    evaluation the first layers down to the last of these Winograd convolutions run as one call (`Fused`).
    The modules, hence the parameters, are shared; the model as written (the tutorial's order) is what is
    saved and shown."""
    if not isinstance(net, nn.Sequential):
        return net
    layers = list(net)
    for i in range(len(layers) - 1):
        if type(layers[i]) is nn.ReLU and type(layers[i + 1]) is nn.MaxPool2d:
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    pooled = []
    for layer in layers:
        if type(layer) is nn.ReLU and pooled and type(pooled[-1]) is kernels.MaxPoolReLU and not pooled[-1].relu:
            pooled[-1].relu = True
        else:
            pooled.append(kernels.MaxPoolReLU(relu=False) if kernels.fusable(layer) else layer)
    out = []
    for layer in pooled:
        if type(layer) is kernels.MaxPoolReLU and len(out) >= 2 and kernels.conv_poolable(out[-1], out[-2]):
            out[-2:] = [kernels.ConvPoolReLU(out[-1], layer, out[-2])]  # fast's: space-to-depth, conv and pooling
        elif type(layer) is kernels.MaxPoolReLU and out and kernels.conv_poolable(out[-1]):
            out[-1] = kernels.ConvPoolReLU(out[-1], layer)
        else:
            out.append(layer)
    normed = []
    for layer in out:  # a BatchNorm with the ReLU after it, or before it: one kernels.BatchNormReLU
        if type(layer) is nn.ReLU and normed and type(normed[-1]) in (nn.BatchNorm1d, nn.BatchNorm2d):
            normed[-1] = kernels.BatchNormReLU(normed[-1])
        elif type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d) and normed and type(normed[-1]) is nn.ReLU:
            normed[-1] = kernels.BatchNormReLU(layer, relu_first=True)
        else:
            normed.append(layer)
    convs = []
    for layer in normed:  # a convolution with a pooling after it: one kernels.WinogradPoolReLU
        if type(layer) is kernels.MaxPoolReLU and convs and type(convs[-1]) is kernels.PatchMatmulConv:
            convs[-1] = kernels.WinogradPoolReLU(convs[-1], layer)
        elif type(layer) is nn.Linear and convs and type(convs[-1]) is nn.Flatten:
            convs[-1] = FlattenLinear(convs[-1], layer)
        elif type(layer) is nn.ReLU and convs and type(convs[-1]) is kernels.PatchMatmulConv and not convs[-1].relu:
            convs[-1].relu = True  # in evaluation, Winograd's pass does it
        else:
            convs.append(kernels.PatchMatmulConv(layer) if kernels.patchable(layer) else layer)
    return Fused(*convs)


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
    for key, value in hparams.items():
        allowed = spec.space.get(key)
        if allowed is not None and value not in allowed:
            raise MnistlabError(f"{name} {key}={value} is outside the model's space ({describe_space(allowed)}); "
                                "pick a value in it")
    net = spec.builder(num_classes=num_classes, **{**spec.defaults, **hparams})
    net.eval()  # a batch of one through BatchNorm needs eval mode
    with torch.no_grad():
        net(torch.zeros(1, *INPUT_SHAPE))
    net.train()
    keras_init_(net)
    return net


def describe_space(allowed) -> str:
    """`32..128 step 16`, `3, 5` or `0.0 <= x < 1.0`: a model's allowed values, for messages."""
    if isinstance(allowed, range):
        return f"{allowed.start}..{allowed.stop - 1} step {allowed.step}"
    return str(allowed) if isinstance(allowed, Interval) else ", ".join(map(str, allowed))


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise MnistlabError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def batchnorm_values(net: nn.Module) -> int | None:
    """The fewest values a channel that one image gives any BatchNorm layer of `net` (the height x width
    of its input; 1 for BatchNorm1d), or None without BatchNorm. In training, BatchNorm needs more than
    one value a channel in a batch."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return None
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0][0].numel() // inputs[0].shape[1]))
             for m in layers]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *INPUT_SHAPE, device=next(net.parameters(), torch.empty(0)).device))
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return min(sizes)


def count_params(net: nn.Module) -> dict[str, int]:
    """Keras's totals: BatchNorm moving mean/variance count as non-trainable parameters."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    moving = sum(b.numel() for name, b in net.named_buffers() if name.endswith(("running_mean", "running_var")))
    return {"total": trainable + frozen + moving, "trainable": trainable, "non_trainable": frozen + moving}


KERAS_NAMES = {nn.Conv2d: ("conv2d", "Conv2D"), nn.MaxPool2d: ("max_pooling2d", "MaxPooling2D"),
               nn.Dropout: ("dropout", "Dropout"), nn.Flatten: ("flatten", "Flatten"),
               nn.Linear: ("dense", "Dense"), nn.BatchNorm2d: ("batch_normalization", "BatchNormalization"),
               nn.BatchNorm1d: ("batch_normalization", "BatchNormalization"),
               nn.PixelUnshuffle: ("space_to_depth", "SpaceToDepth")}


def summary(net: nn.Sequential, name: str = "sequential") -> str:
    """Keras's model.summary(): a row per layer (a ReLU folds into the layer before it, as Keras's
    activation= does), output shapes channels-last as Keras shows them, and the parameter totals."""
    rows, seen = [], {}
    x = torch.zeros(1, *INPUT_SHAPE)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                continue
            base, kind = KERAS_NAMES.get(type(layer), (type(layer).__name__.lower(), type(layer).__name__))
            count = seen[base] = seen.get(base, -1) + 1
            shape = (None, *x.shape[2:], x.shape[1]) if x.dim() == 4 else (None, *x.shape[1:])
            params = count_params(layer)["total"]
            rows.append((f"{base}{f'_{count}' if count else ''} ({kind})", str(shape), params))
    net.train(was_training)
    totals = count_params(net)
    line, double, width = "_" * 80, "=" * 80, (44, 24, 12)
    out = [f'Model: "{name}"', line,
           f"{'Layer (type)':<{width[0]}}{'Output Shape':<{width[1]}}{'Param #':>{width[2]}}", double]
    for i, (layer, shape, params) in enumerate(rows):
        out += [f"{layer:<{width[0]}}{shape:<{width[1]}}{params:>{width[2]},}", line if i < len(rows) - 1 else double]
    out += [f"Total params: {totals['total']:,}", f"Trainable params: {totals['trainable']:,}",
            f"Non-trainable params: {totals['non_trainable']:,}", line]
    return "\n".join(out)


@dataclass
class Architecture:
    """What is needed to rebuild a saved model by name (stored as model.json beside the weights)."""
    name: str
    hparams: dict
    num_classes: int
    classes: list[str]
    dataset: str


def save_weights(net: nn.Module, path: Path) -> None:
    """Weights as safetensors (loading them executes no code), written atomically, from CPU copies
    wherever the net trained (load_model loads onto the CPU)."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def save_model(net: nn.Module, arch: Architecture, folder: Path) -> None:
    """model.safetensors plus model.json, what rebuilds the model by name."""
    save_weights(net, Path(folder) / "model.safetensors")
    write_json(Path(folder) / "model.json", asdict(arch))


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
