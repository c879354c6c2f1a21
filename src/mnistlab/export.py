"""Export a trained run for use outside mnistlab: ONNX (any ONNX runtime, dynamic batch size) or
TorchScript (PyTorch without mnistlab's code). Every export is checked against PyTorch before it
is written: the same inputs must give the same logits within TOLERANCE.

Inputs of both: float32 [N, 1, 28, 28] in [0, 1] (uint8 images / 255, prepared by predict.prepare);
outputs: logits [N, num_classes] (softmax gives the probabilities).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data, models
from .errors import MnistlabError
from .runfiles import atomic_path

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}  # format -> default file in the run folder
TOLERANCE = 1e-4  # max abs difference of logits between PyTorch and the exported model
CHECK_BATCHES = (1, 37)  # batch sizes checked at export: the dynamic batch axis must really be dynamic
ONNX_HINT = "install the ONNX extra: pip install 'mnistlab[onnx]'"


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # largest |logit difference| against PyTorch over CHECK_BATCHES


def _require(module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError:
        raise MnistlabError(f"{purpose} needs the {module} package; {ONNX_HINT}") from None


@contextlib.contextmanager
def _quiet():
    """The exporters' progress logs and deprecation warnings are noise on the mnistlab command line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(n, *models.INPUT_SHAPE, generator=generator) for n in CHECK_BATCHES]


@torch.inference_mode()
def _max_diff(net: nn.Module, run_exported) -> float:
    return max(float(np.abs(run_exported(x) - net(x).numpy()).max()) for x in _check_inputs())


def onnx_bytes(net: nn.Module, arch: models.Architecture) -> bytes:
    """The network as an ONNX model with a dynamic batch axis, its classes and data set in the metadata.

    torch 2.13's default exporter (dynamo=True, torch.export based; it needs the onnx and onnxscript
    packages) is used: the older TorchScript-based one (dynamo=False) still works but is deprecated
    and announced for removal."""
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    net = net.eval()
    example = torch.rand(2, *models.INPUT_SHAPE)  # torch.export specialises sizes 0 and 1; 2 stays dynamic
    try:
        with _quiet():
            program = torch.onnx.export(net, (example,), dynamo=True, verbose=False, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:  # the exporter's own error types vary between torch versions
        raise MnistlabError(f"ONNX export of {arch.name} failed ({str(err).strip().splitlines()[0]}); "
                            "use --format torchscript, or report it with your torch version") from err
    proto = program.model_proto
    metadata = {"classes": json.dumps(arch.classes), "dataset": arch.dataset, "model": arch.name,
                "input": "float32 [N, 1, 28, 28] in [0, 1], prepared as mnistlab.predict.prepare does",
                "preparation": data.DATASETS[arch.dataset].preparation if arch.dataset in data.DATASETS else "mnist"}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnx_runner(model: bytes | str | os.PathLike):
    """A function float32 array [N, 1, 28, 28] -> logits array [N, C], run by ONNX Runtime with as many
    threads as torch uses (so OMP_NUM_THREADS limits both)."""
    ort = _require("onnxruntime", "the ONNX engine")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own (unimportable) error types for bad files
        raise MnistlabError(f"ONNX Runtime cannot load the model ({str(err).strip().splitlines()[0]}); "
                            "export it again with `mnistlab export RUN --format onnx`") from err
    name = session.get_inputs()[0].name

    def run(images: np.ndarray | torch.Tensor) -> np.ndarray:
        images = images.numpy() if isinstance(images, torch.Tensor) else images
        return session.run(None, {name: np.ascontiguousarray(images, np.float32)})[0]
    return run


def onnx_session(run: Path, net: nn.Module | None = None, arch: models.Architecture | None = None):
    """An ONNX Runtime runner for a run folder: RUN/model.onnx if it is newer than the weights, else the
    network (loaded from the run unless given) exported in memory; nothing is written."""
    run = Path(run)
    _require("onnxruntime", "the ONNX engine")
    saved, weights = run / FORMATS["onnx"], run / "model.safetensors"
    if saved.is_file() and weights.is_file() and saved.stat().st_mtime >= weights.stat().st_mtime:
        return onnx_runner(saved)
    if net is None or arch is None:
        net, arch = models.load_model(run)
    return onnx_runner(onnx_bytes(net, arch))


def export_onnx(net: nn.Module, arch: models.Architecture, path: Path) -> float:
    """Write the ONNX model to path after checking it against PyTorch; returns the max abs difference."""
    blob = onnx_bytes(net, arch)
    diff = _max_diff(net, onnx_runner(blob))
    _check(diff, "ONNX Runtime")
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return diff


def export_torchscript(net: nn.Module, path: Path) -> float:
    """Write the network as TorchScript (torch.jit.script, which keeps no example-specific shapes) after
    checking the reloaded file against the network; returns the max abs difference. TorchScript is
    deprecated in recent torch but still the way to run a model without its Python code."""
    net = net.eval()
    with _quiet():
        scripted = torch.jit.script(net)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
            reloaded = torch.jit.load(str(tmp))
            diff = _max_diff(net, lambda x: reloaded(x).numpy())
            _check(diff, "TorchScript")
    return diff


def _check(diff: float, engine: str) -> None:
    if not diff <= TOLERANCE:  # also catches NaN
        raise MnistlabError(f"the {engine} export differs from PyTorch by {diff:.2g} (over {TOLERANCE:g}); "
                            "nothing was written: report it with your torch version")


def export(run: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None) -> ExportResult:
    """Export a run folder's model as `format` (onnx | torchscript) to out (default RUN/model.onnx or
    RUN/model.pt), verified against PyTorch."""
    if format not in FORMATS:
        raise MnistlabError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    run = Path(run)
    net, arch = models.load_model(run)
    path = Path(out) if out else run / FORMATS[format]
    diff = export_onnx(net, arch, path) if format == "onnx" else export_torchscript(net, path)
    return ExportResult(path, format, diff)
