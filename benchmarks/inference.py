"""Inference engines side by side: images/s at batch 1000 and 256, and single-image latency.

    python benchmarks/inference.py                       # seed003, every engine present
    python benchmarks/inference.py --model fast --repeats 7

Engines: eager PyTorch (fp32 and bf16 autocast, channels_last, inference_mode; each also as
`models.fused` runs it, the ReLUs after the poolings and each pooling one native kernel, as
mnistlab's evaluation does), TorchScript frozen
with torch.jit.optimize_for_inference, and ONNX Runtime and OpenVINO, each on the fp32 ONNX model
and on the int8 one `mnistlab export --format int8` writes (static quantisation calibrated on 1,000
training images; its accuracy is reported since it changes). Every engine runs
the same 10,000 test images of real MNIST; the rounds alternate engines so that a noisy machine
slows all of them alike, and each figure is a median over rounds. A trained network is used when
--run is given, else a fresh one (speed does not depend on the weights; accuracy then means little).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mnistlab import data, devices, models
from mnistlab.errors import MnistlabError


def torch_engine(net, precision: str):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            return net(x.contiguous(memory_format=torch.channels_last)).float()
    return run


def torchscript_engine(net):
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, torch.rand(8, 1, 28, 28))))

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return frozen(x)
    return run


def exported_engines(net, arch, calibration_u8: torch.Tensor) -> dict:
    """ONNX Runtime and OpenVINO, each on the fp32 model and on the int8 one (export.int8_bytes: static
    QDQ quantisation calibrated on the given training images), where installed."""
    from mnistlab import export
    try:
        blob = export.onnx_bytes(net, arch)
        int8 = export.int8_bytes(blob, calibration_u8)
    except MnistlabError as err:
        print(f"no ONNX rows: {err}", file=sys.stderr)
        return {}
    engines = {}
    for name, runner in (("onnxruntime", export.onnx_runner), ("openvino", export.openvino_runner)):
        try:
            engines.update({f"{name} fp32": runner(blob), f"{name} int8": runner(int8)})
        except MnistlabError as err:
            print(f"no {name} rows: {err}", file=sys.stderr)
    return {name: (lambda run: lambda x: torch.from_numpy(run(x.numpy())))(run) for name, run in engines.items()}


def rate(run, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        run(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def latency_ms(run, one: torch.Tensor, calls: int = 200) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(one)
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed003")
    parser.add_argument("--run", help="a run folder whose trained network to use")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    devices.reuse_freed_memory()  # as every mnistlab command does: the torch rows measure mnistlab's engine
    if args.run:
        net, arch = models.load_model(Path(args.run))
    else:
        torch.manual_seed(0)
        net = models.create_model(args.model)
        arch = models.Architecture(args.model, {}, 10, [str(i) for i in range(10)], "mnist")
    net = net.eval().to(memory_format=torch.channels_last)
    test = data.load("mnist", "test")
    x = models.to_input(test.images, channels_last=False).contiguous()
    engines = {"torch fp32": torch_engine(net, "fp32"), "torch bf16": torch_engine(net, "bf16"),
               "torch fp32 fused": torch_engine(models.fused(net), "fp32"),
               "torch bf16 fused": torch_engine(models.fused(net), "bf16"),
               "torchscript frozen": torchscript_engine(net),
               **exported_engines(net, arch, data.load("mnist", "train").images[:1000])}
    accuracy = {name: float((run(x).argmax(1) == test.labels).float().mean()) for name, run in engines.items()}
    rates = {name: {1000: [], 256: []} for name in engines}
    latencies = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, run in engines.items():
            for batch in (1000, 256):
                rates[name][batch].append(rate(run, x, batch))
            latencies[name] += latency_ms(run, x[:1])[20:]
    print(f"\n`python benchmarks/inference.py {' '.join(sys.argv[1:])}` - {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, model {arch.name}{' (trained: ' + args.run + ')' if args.run else ''}\n")
    print("| engine | images/s @1000 | images/s @256 | 1 image p50 ms | p99 ms | test accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in engines:
        lat = sorted(latencies[name])
        print(f"| {name} | {statistics.median(rates[name][1000]):,.0f} | {statistics.median(rates[name][256]):,.0f} | "
              f"{lat[len(lat) // 2]:.3f} | {lat[int(len(lat) * 0.99)]:.3f} | {accuracy[name] * 100:.2f}% |")


if __name__ == "__main__":
    main()
