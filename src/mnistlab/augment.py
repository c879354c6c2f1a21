"""ImageDataGenerator-style augmentation for whole batches: one sampling grid per batch.

Each image gets its own random rotation, shift, zoom (and flip) drawn from a seeded generator,
composed into one 2x3 matrix; a single `grid_sample` call warps the batch. Like Keras, zoom is
drawn per axis, the fill is the nearest edge pixel, and interpolation is bilinear. Elastic
distortion (Simard et al. 2003, "Best practices for convolutional neural networks applied to visual
document analysis": a random field of pixel displacements in [-1, 1], smoothed by a Gaussian of
`elastic_sigma` pixels and scaled by `elastic_alpha`) is added to the same grid: still one warp.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    rotation_range: float = 0.0     # degrees
    width_shift_range: float = 0.0  # fraction of the width
    height_shift_range: float = 0.0
    zoom_range: float = 0.0
    horizontal_flip: bool = False
    elastic_alpha: float = 0.0      # pixels; 0 turns elastic distortion off
    elastic_sigma: float = 4.0      # pixels

    @classmethod
    def of(cls, settings: dict) -> "Augmentation":
        """The augmentation among a run's settings (a TrainConfig as a dict, or a run's config.json)."""
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})

    def settings(self) -> dict:
        """The settings that warp: the non-zero ones (elastic sigma only with an elastic alpha)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) and (f.name != "elastic_sigma" or self.elastic_alpha)}

    @property
    def active(self) -> bool:
        return bool(self.settings())


def random_affine(n: int, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """[n, 2, 3] matrices in affine_grid's normalised coordinates (output -> input sampling)."""
    device = generator.device  # drawn where the generator lives: on the GPU when training there

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=device) * 2 - 1) * limit

    angle = uniform(math.radians(aug.rotation_range))
    zoom_x, zoom_y = 1 + uniform(aug.zoom_range), 1 + uniform(aug.zoom_range)
    flip = (torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0) if aug.horizontal_flip
            else torch.ones(n, device=device))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * zoom_x * flip, -sin * zoom_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * zoom_x * flip, cos * zoom_y
    theta[:, 0, 2] = uniform(2 * aug.width_shift_range)  # the image spans 2 in normalised units
    theta[:, 1, 2] = uniform(2 * aug.height_shift_range)
    return theta


def elastic_field(n: int, height: int, width: int, alpha: float, sigma: float,
                  generator: torch.Generator) -> torch.Tensor:
    """[n, height, width, 2] displacements in grid_sample's normalised units (x then y): uniform noise
    in [-1, 1] per pixel and axis, blurred by a separable Gaussian, times alpha pixels."""
    device = generator.device
    noise = torch.rand(n, 2, height, width, generator=generator, device=device) * 2 - 1
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    field = F.conv2d(noise, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, radius), groups=2)
    field = F.conv2d(field, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(radius, 0), groups=2)
    scale = torch.tensor([2 / width, 2 / height], device=device)  # one pixel in normalised units
    return field.permute(0, 2, 3, 1) * alpha * scale


def augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator, batch_len: int | None = None,
            part: slice = slice(None)) -> torch.Tensor:
    """Warp a float batch [N, C, H, W] with one random transform per image. In data-parallel training
    x is one process's `part` of a global batch of `batch_len` images: the whole batch's transforms
    are drawn and the part's kept, so each image is warped as in a single process."""
    n, (height, width) = batch_len or len(x), x.shape[-2:]
    theta = random_affine(n, aug, generator)[part]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if aug.elastic_alpha:
        grid = grid + elastic_field(n, height, width, aug.elastic_alpha, aug.elastic_sigma, generator)[part]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
