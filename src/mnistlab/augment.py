"""ImageDataGenerator-style augmentation for whole batches: one affine grid per batch.

Each image gets its own random rotation, shift, zoom (and flip) drawn from a seeded generator,
composed into one 2x3 matrix; a single `grid_sample` call warps the batch. Like Keras, zoom is
drawn per axis, the fill is the nearest edge pixel, and interpolation is bilinear.
"""
from __future__ import annotations

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

    @property
    def active(self) -> bool:
        return bool(self.rotation_range or self.width_shift_range or self.height_shift_range
                    or self.zoom_range or self.horizontal_flip)


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


def augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator, batch_len: int | None = None,
            part: slice = slice(None)) -> torch.Tensor:
    """Warp a float batch [N, C, H, W] with one random transform per image. In data-parallel training
    x is one process's `part` of a global batch of `batch_len` images: the whole batch's transforms
    are drawn and the part's kept, so each image is warped as in a single process."""
    theta = random_affine(batch_len or len(x), aug, generator)[part]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
