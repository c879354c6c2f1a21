"""Export a trained run for use outside mnistlab: ONNX (any ONNX runtime, dynamic batch size), int8
ONNX (quantised, for OpenVINO's or ONNX Runtime's int8 kernels) or TorchScript (PyTorch without
mnistlab's code). Every export is checked before it is written: ONNX and TorchScript must give
PyTorch's logits within TOLERANCE; int8 must keep PyTorch's test accuracy within INT8_MAX_DROP.

Inputs of all: float32 [N, 1, 28, 28] in [0, 1] (uint8 images / 255, prepared by predict.prepare);
outputs: logits [N, num_classes] (softmax gives the probabilities).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data, models
from .errors import MnistlabError
from .runfiles import atomic_path

FORMATS = {"onnx": "model.onnx", "int8": "model.int8.onnx", "torchscript": "model.pt"}  # -> file in the run
TOLERANCE = 1e-4  # max abs difference of logits between PyTorch and the exported model
CHECK_BATCHES = (1, 37)  # batch sizes checked at export: the dynamic batch axis must really be dynamic
INT8_CALIBRATION = 1000  # training images whose activation ranges set the int8 scales
INT8_CHECK = 2000        # test images on which the int8 model must keep PyTorch's accuracy ...
INT8_MAX_DROP = 0.005    # ... within this much, else nothing is written
ONNX_HINT = "install the ONNX extra: pip install 'mnistlab[onnx]'"
OPENVINO_HINT = "install the OpenVINO extra: pip install 'mnistlab[openvino]'"
RUNTIMES = ("onnx", "openvino")  # the engines that run an exported model


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None  # largest |logit difference| against PyTorch over CHECK_BATCHES (not int8)
    accuracy: tuple[float, float] | None = None  # int8: (PyTorch, int8) accuracy on INT8_CHECK test images


def _require(module: str, purpose: str, hint: str = ONNX_HINT):
    try:
        return __import__(module)
    except ImportError:
        raise MnistlabError(f"{purpose} needs the {module} package; {hint}") from None


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


def openvino_runner(model: bytes | str | os.PathLike):
    """onnx_runner's twin on OpenVINO (the `openvino` extra), whose int8 kernels (VNNI) run an int8
    model about twice as fast as ONNX Runtime does on this kind of CPU (benchmarks/RESULTS.md). What
    is not int8 runs in fp32: OpenVINO would pick bf16 on some CPUs by itself."""
    ov = _require("openvino", "the OpenVINO engine", OPENVINO_HINT)
    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(model if isinstance(model, bytes) else str(model)), "CPU",
                                      {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                       "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    except RuntimeError as err:  # OpenVINO reports a bad file as a RuntimeError with its C++ trace
        raise MnistlabError(f"OpenVINO cannot load the model ({str(err).strip().splitlines()[-1]}); "
                            "export it again with `mnistlab export RUN --format onnx` (or int8)") from err
    request = compiled.create_infer_request()

    def run(images: np.ndarray | torch.Tensor) -> np.ndarray:
        images = images.numpy() if isinstance(images, torch.Tensor) else images
        return request.infer([np.ascontiguousarray(images, np.float32)])[0].copy()  # the next call reuses it
    return run


def int8_bytes(blob: bytes, calibration_u8: torch.Tensor) -> bytes:
    """The ONNX model quantised to int8 by ONNX Runtime's static quantiser, in QDQ form: int8 weights,
    uint8 activations whose ranges are measured on the calibration images (uint8 [N, 28, 28]).
    OpenVINO and ONNX Runtime both run it with int8 kernels; the metadata is kept."""
    onnx = _require("onnx", "int8 quantisation")
    _require("onnxruntime", "int8 quantisation")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = (models.to_input(calibration_u8[i:i + 100], False).numpy()
                            for i in range(0, len(calibration_u8), 100))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, prepared, target = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(blob)
        quant_pre_process(str(source), str(prepared))  # shape inference and graph clean-up first, as advised
        quantize_static(str(prepared), str(target), Calibration(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantised = onnx.load_model_from_string(target.read_bytes())
    del quantised.metadata_props[:]
    quantised.metadata_props.extend(onnx.load_model_from_string(blob).metadata_props)
    return quantised.SerializeToString()


def _calibration_images(arch: models.Architecture, data_dir=None) -> torch.Tensor:
    return data.load(arch.dataset, "train", data_dir).images[:INT8_CALIBRATION]


def session(run: Path, engine: str = "onnx", int8: bool = False, net: nn.Module | None = None,
            arch: models.Architecture | None = None, data_dir=None):
    """A runner for a run folder on ONNX Runtime or OpenVINO (`engine`), of the fp32 or the int8 model:
    RUN/model.onnx (or model.int8.onnx) if it is newer than the weights, else the network (loaded from
    the run unless given) exported in memory, an int8 one calibrated on the run's training images;
    nothing is written."""
    if engine not in RUNTIMES:
        raise MnistlabError(f"unknown engine {engine!r} for an exported model; choose one of: {', '.join(RUNTIMES)}")
    run = Path(run)
    runner = openvino_runner if engine == "openvino" else onnx_runner
    if engine == "openvino":
        _require("openvino", "the OpenVINO engine", OPENVINO_HINT)
    else:
        _require("onnxruntime", "the ONNX engine")
    saved, weights = run / FORMATS["int8" if int8 else "onnx"], run / "model.safetensors"
    if saved.is_file() and weights.is_file() and saved.stat().st_mtime >= weights.stat().st_mtime:
        return runner(saved)
    if net is None or arch is None:
        net, arch = models.load_model(run)
    blob = onnx_bytes(net, arch)
    if not int8:
        return runner(blob)
    try:
        calibration = _calibration_images(arch, data_dir)
    except MnistlabError as err:
        raise MnistlabError(f"int8 without {saved.name} quantises at start, on the training images, which are "
                            f"missing ({err}); or copy in a model.int8.onnx from `mnistlab export RUN --format int8` "
                            "run where the data set is") from None
    return runner(int8_bytes(blob, calibration))


def export_onnx(net: nn.Module, arch: models.Architecture, path: Path) -> float:
    """Write the ONNX model to path after checking it against PyTorch; returns the max abs difference."""
    blob = onnx_bytes(net, arch)
    diff = _max_diff(net, onnx_runner(blob))
    _check(diff, "ONNX Runtime")
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return diff


def export_int8(net: nn.Module, arch: models.Architecture, path: Path, data_dir=None) -> tuple[float, float]:
    """Write the int8 model to path after checking its accuracy (ONNX Runtime) against PyTorch's on the
    first INT8_CHECK test images; returns both accuracies."""
    quantised = int8_bytes(onnx_bytes(net, arch), _calibration_images(arch, data_dir))
    test = data.load(arch.dataset, "test", data_dir)
    images, labels = models.to_input(test.images[:INT8_CHECK], False), test.labels[:INT8_CHECK].numpy()
    with torch.inference_mode():
        reference = float((net.eval()(images).argmax(1).numpy() == labels).mean())
    accuracy = float((onnx_runner(quantised)(images).argmax(1) == labels).mean())
    if not accuracy >= reference - INT8_MAX_DROP:
        raise MnistlabError(f"the int8 model's accuracy on {len(labels):,} test images is {accuracy:.2%}, "
                            f"{reference - accuracy:.2%} below PyTorch's {reference:.2%}; nothing was written: "
                            "export --format onnx and run it in fp32")
    with atomic_path(path) as tmp:
        tmp.write_bytes(quantised)
    return reference, accuracy


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


def export(run: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None,
           data_dir: str | os.PathLike | None = None) -> ExportResult:
    """Export a run folder's model as `format` (onnx | int8 | torchscript) to out (default RUN/model.onnx,
    RUN/model.int8.onnx or RUN/model.pt), verified against PyTorch. int8 reads the run's data set
    (calibration and check images) from data_dir."""
    if format not in FORMATS:
        raise MnistlabError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    run = Path(run)
    net, arch = models.load_model(run)
    path = Path(out) if out else run / FORMATS[format]
    if format == "int8":
        return ExportResult(path, format, None, export_int8(net, arch, path, data_dir))
    diff = export_onnx(net, arch, path) if format == "onnx" else export_torchscript(net, path)
    return ExportResult(path, format, diff)
