"""Where training runs and in which precision: the device (auto: cuda, else mps, else cpu) and autocast.

On a GPU the uint8 data set is copied there once, so batches are gathered, scaled and augmented
on the GPU and the host only queues work. Mixed precision is bf16 (same range as fp32: no loss
scaling) or fp16 (CUDA only, with PyTorch's GradScaler). Weights are always saved from CPU
copies and loaded onto the CPU, so a run trained anywhere is evaluated, reported and served anywhere.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

from .errors import MnistlabError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """`auto` -> the best device present; a requested device that is absent is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MnistlabError("--device cuda: no CUDA GPU is visible to torch (a CPU build of torch, or no driver); "
                            "use --device cpu, or install a CUDA build of torch")
    if name == "mps" and not mps_available():
        raise MnistlabError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    if name not in DEVICES:
        raise MnistlabError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    return torch.device(name)


def bf16_supported(device: torch.device = torch.device("cpu")) -> bool:
    """bf16 that runs fast: oneDNN's bf16 kernels on a CPU, Ampere or newer on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device = torch.device("cpu")) -> str:
    """`auto` -> bf16 where the device has it, else fp32 (fp16 needs loss scaling: only on request)."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise MnistlabError(f"--precision fp16 trains on CUDA GPUs only (with a GradScaler); "
                            f"use --precision bf16 or fp32 on {device.type}")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision; fp32 runs without one."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                          enabled=precision in AUTOCAST_DTYPES)


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep the memory a step frees for the next step, once per process (glibc only).

    glibc hands blocks over 128 KB back to the kernel when they are freed (munmap, heap trimming),
    so every training step and every large inference batch faults its activations in again, page
    by page; in training glibc's adaptive thresholds catch up only after most of a first epoch.
    Here large blocks come from the heap and up to 1 GB of freed heap is kept. Measured (commands
    in benchmarks/RESULTS.md): seed003's first epoch 2.9 million page faults and 5.6 s of kernel
    time before, 50 thousand and 0.3 s after; seed003 inference at batch 1000 2.3-3x faster. The peak
    memory is unchanged: what is kept is reused, not added. MNISTLAB_MALLOPT=0 keeps glibc's
    defaults. Returns whether the setting was made."""
    if os.environ.get("MNISTLAB_MALLOPT", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
