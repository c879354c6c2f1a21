"""Training and inference speed of every zoo model, engine options side by side in one run.

    python benchmarks/throughput.py                      # all models, the eager engine variants
    python benchmarks/throughput.py --models seed003 --repeats 5
    python benchmarks/throughput.py --models seed003 --variants bf16+cl,bf16+cl+compile --no-memory
    python benchmarks/throughput.py --loop-cost seed003 --images 54000   # the loop against the bare step

Training images/s runs the real training loop (train.train_epoch) on real MNIST, at each
model's recipe batch size and at 256, for each engine variant; every figure is the median of
--repeats timed passes after one warm-up pass. Inference is images/s at batch 1000 and 256,
and single-image latency (p50, p99). Peak resident memory is measured in a child process per
model that runs its recipe's training for a few hundred steps. These CPUs are noisy (30-50%
between runs): compare figures within one table, not across runs.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mnistlab import data, devices, models
from mnistlab.config import RECIPES, TrainConfig
from mnistlab.evaluate import predict_logits
from mnistlab.train import KERAS_LR, Loop, make_optimizer, train_epoch

VARIANTS = {  # name: (precision, channels_last, torch.compile)
    "fp32": ("fp32", False, False),
    "fp32+cl": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16+cl": ("bf16", True, False),
    "fp32+cl+compile": ("fp32", True, True),
    "bf16+cl+compile": ("bf16", True, True),
}
# torch.compile was slower for every model here (RESULTS.md, seventh pass): measured only when asked for by name
DEFAULT_VARIANTS = ",".join(v for v, (_, _, compiled) in VARIANTS.items() if not compiled)
# What training picks here: bf16 where the CPU runs it natively (the passes up to the thirteenth), else fp32
# (an AVX2-only CPU emulates bf16 several times slower than fp32: fourteenth pass).
PRECISION = devices.resolve_precision("auto")


def make_loop(name: str, batch_size: int, precision: str, channels_last: bool, num_images: int,
              compiled: bool = False) -> Loop:
    """A fresh `name` with its recipe's optimizer and rate, in a Loop that train_epoch can run; if
    compiled, the steps (forward and backward) run through torch.compile (Inductor's C++ kernels on a CPU)."""
    config = TrainConfig(**{**RECIPES.get(name, {}), "model": name, "batch_size": batch_size,
                            "channels_last": channels_last, "precision": precision, "dataset": "mnist"})
    torch.manual_seed(0)
    net = models.create_model(name)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lr = KERAS_LR[config.optimizer] if config.lr is None else config.lr
    loop = Loop(net, make_optimizer(config.optimizer, net.parameters(), lr), config, lr,
                -(-num_images // batch_size), None, progress=False)
    if compiled:
        loop.train_net = torch.compile(loop.train_net)
    return loop


def train_rate(name: str, batch_size: int, precision: str, channels_last: bool, compiled: bool, images, labels,
               repeats: int) -> float:
    """Median training images/s of the real loop over `len(labels)` images."""
    loop = make_loop(name, batch_size, precision, channels_last, len(labels), compiled)
    train_epoch(loop, images, labels, precision)  # warm-up: oneDNN picks its kernels, compile builds them
    rates = []
    for _ in range(repeats):
        loop.step = 0
        start = time.perf_counter()
        train_epoch(loop, images, labels, PRECISION)
        rates.append(len(labels) / (time.perf_counter() - start))
    return statistics.median(rates)


def loop_cost(name: str, images, labels, repeats: int) -> None:
    """The real loop (train_epoch, PRECISION + channels_last, the recipe's batch and optimizer) against the
    bare step on the same batches (forward, loss, backward, optimizer step, nothing else), rounds
    alternating, one warm-up of each: what the loop's bookkeeping costs."""
    loop = make_loop(name, RECIPES.get(name, {}).get("batch_size", 64), PRECISION, True, len(labels))
    step_net, optimizer, b = loop.train_net, loop.optimizer, loop.config.batch_size  # as the loop steps it

    def bare():
        for start in range(0, len(labels), b):
            x = models.to_input(images[start:start + b])
            with devices.autocast(x.device, PRECISION):
                logits = step_net(x)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits.float(), labels[start:start + b]).backward()
            optimizer.step()

    def real():
        loop.step = 0
        train_epoch(loop, images, labels, PRECISION)

    times = {"bare step": [], "train_epoch": []}
    for rnd in range(repeats + 1):
        for label, run in (("bare step", bare), ("train_epoch", real)):
            start = time.perf_counter()
            run()
            if rnd:  # round 0 warms up
                times[label].append(time.perf_counter() - start)
    print(f"{name}, batch {b}, {len(labels)} images, {PRECISION} + channels_last, {repeats} rounds alternating:\n")
    print("| | seconds per pass (each round) | median | ratio |\n|---|---|---|---|")
    base = statistics.median(times["bare step"])
    for label, ts in times.items():
        print(f"| {label} | {', '.join(f'{t:.2f}' for t in ts)} | {statistics.median(ts):.2f} | "
              f"{statistics.median(ts) / base:.2f} |")


def inference(name: str, images, repeats: int) -> dict:
    torch.manual_seed(0)
    net = models.create_model(name).eval().to(memory_format=torch.channels_last)
    result = {}
    for batch in (1000, 256):
        predict_logits(net, images[:batch], batch_size=batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict_logits(net, images, batch_size=batch)
            times.append(time.perf_counter() - start)
        result[f"infer_b{batch}"] = len(images) / statistics.median(times)
    one = models.to_input(images[:1])
    latencies = []
    with torch.inference_mode():
        for i in range(300):
            start = time.perf_counter()
            net(one)
            latencies.append(time.perf_counter() - start)
    latencies = sorted(latencies[50:])  # the first calls warm up
    result["p50_ms"] = 1000 * latencies[len(latencies) // 2]
    result["p99_ms"] = 1000 * latencies[int(len(latencies) * 0.99)]
    return result


def peak_memory_mb(name: str) -> float:
    """Peak RSS of a fresh child process that loads MNIST and runs the model's recipe's training (the
    defaults for a model without one, as make_loop) for ~300 steps."""
    batch = RECIPES.get(name, {}).get("batch_size", 64)
    recipe = name if name in RECIPES else ""
    code = ("import resource, torch; from mnistlab.train import fit; from mnistlab.config import resolve_config; "
            f"c = resolve_config({recipe!r}, overrides=dict(model={name!r}, epochs=1, limit_train={300 * batch}, "
            "val_data='split', dataset='mnist')); "
            "fit(c, progress=False); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"peak-memory child for {name} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(sorted(models.MODELS)))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--images", type=int, default=6400, help="training images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-train", action="store_true", help="skip the training table")
    parser.add_argument("--batches", default="recipe,256", help="training batch sizes: recipe and/or numbers")
    parser.add_argument("--loop-cost", metavar="MODEL", help="only time the training loop against the bare step")
    args = parser.parse_args()
    names, variants = args.models.split(","), args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"throughput.py: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    devices.reuse_freed_memory()  # as every mnistlab command does: the rows measure mnistlab's engine

    start = time.perf_counter()
    train_set = data.load("mnist", "train")
    data.load("mnist", "test")
    load_seconds = time.perf_counter() - start
    images, labels = train_set.images[:args.images], train_set.labels[:args.images]
    test_images = data.load("mnist", "test").images

    print(f"# throughput: {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(f"data load (train + test, from {data.locate('mnist')}): {load_seconds:.2f} s\n")
    if args.loop_cost:
        loop_cost(args.loop_cost, images, labels, args.repeats)
        print("\ncommand: python benchmarks/throughput.py " + " ".join(sys.argv[1:]))
        return
    print("training images/s (median of repeats; the recipe's batch and 256):\n")
    header = ["model", "batch"] + variants + [f"best/{variants[0]}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names if not args.no_train else []:
        batches = {RECIPES.get(name, {}).get("batch_size", 64) if b == "recipe" else int(b) for b in args.batches.split(",")}
        for batch in sorted(batches):
            rates = {v: train_rate(name, batch, *VARIANTS[v], images, labels, args.repeats) for v in variants}
            ratio = max(rates.values()) / rates[variants[0]]
            print(f"| {name} | {batch} | " + " | ".join(f"{rates[v]:,.0f}" for v in variants) + f" | {ratio:.2f}x |",
                  flush=True)
    print("\ninference (fp32, channels_last, inference_mode):\n")
    print("| model | images/s @1000 | images/s @256 | 1 image p50 ms | p99 ms | peak RSS MB (recipe training) |\n"
          "|---|---|---|---|---|---|")
    for name in names:
        r = inference(name, test_images, args.repeats)
        memory = "-" if args.no_memory else f"{peak_memory_mb(name):,.0f}"
        print(f"| {name} | {r['infer_b1000']:,.0f} | {r['infer_b256']:,.0f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {memory} |", flush=True)
    print(f"\nthis process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    print("command: python benchmarks/throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
