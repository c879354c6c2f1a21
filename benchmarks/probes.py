"""Probes behind RESULTS.md's seventh to ninth passes: ideas measured, kept so the figures can be rerun.

Seventh pass:
    python benchmarks/probes.py maxpool          # one-pass-gradient 2x2 max poolings against F.max_pool2d
    python benchmarks/probes.py step             # the seed003 step, and what its optimizer step costs
    python benchmarks/probes.py bn RUN [RUN ...] # BatchNorm statistics re-estimated on clean training images
    python benchmarks/probes.py macs             # multiply-adds per image: best against a 5x5 no-pooling net
Eighth pass (the real training loop, each model in two versions side by side; then one model's step):
    python benchmarks/probes.py dropout          # models.Dropout (adopted) against nn.Dropout
    python benchmarks/probes.py relu-inplace     # ReLU(inplace=True) against ReLU (not adopted)
    python benchmarks/probes.py compile-pooling  # seed003 with its max poolings through torch.compile (not adopted)
    python benchmarks/probes.py profile MODEL [--nn-dropout]   # where a training step's time goes
Ninth pass:
    python benchmarks/probes.py fused-pooling    # kernels.MaxPoolReLU (adopted) against F.max_pool2d + F.relu
    python benchmarks/probes.py pooling-step     # the same for seed003's bare step, alternating step by step
    python benchmarks/probes.py convs            # seed003's convolutions: forward, input and weight gradients
    python benchmarks/probes.py conv-fp32        # seed003's step with its first or third convolution in fp32
Tenth pass:
    python benchmarks/probes.py rmsprop-step     # kernels.RMSprop (adopted) against torch's foreach RMSprop
    python benchmarks/probes.py parts MODEL      # where a training step goes, by the clock (hooks), not the profiler
    python benchmarks/probes.py conv3-matmul     # kernels.PatchMatmulConv (adopted): seed003's third convolution's weight gradient
    python benchmarks/probes.py patch-matmul     # the same, the real training loop of seed003, fast and best
    python benchmarks/probes.py wgrads           # every plain convolution of the zoo: oneDNN's weight gradient or a matmul
Eleventh pass:
    python benchmarks/probes.py conv-pool-step [--model seed004]  # kernels.ConvPoolReLU (adopted): first conv + pooling, one kernel
    python benchmarks/probes.py conv-pool        # the same, the real training loop of seed003 and seed004
Twelfth pass:
    python benchmarks/probes.py nproc-spread [--optimizer sgd --lr 0.1 --limit-train 64 --seeds 0,1,2]
        # tests/test_distributed.py's training, 1 process against 2: how far rounding alone moves the weights
    python benchmarks/probes.py conv-pool-eval   # kernels.ConvPoolReLU (adopted) in evaluation: seed003, seed004 at batch 1000
Fifteenth pass:
    python benchmarks/probes.py wgrad            # every covered 3x3 convolution: oneDNN's weight gradient, the matmul, kernels.c's
    python benchmarks/probes.py native-wgrad     # kernels.c's weight gradient (adopted) in the real loop of seed003, fast, seed000, best
    python benchmarks/probes.py wgrad-step --model best --steps 60   # the same, a bare step, alternating step by step
Sixteenth pass:
    python benchmarks/probes.py igrad            # every convolution's input gradient: oneDNN's, or a matmul then kernels.c's col2im
    python benchmarks/probes.py col2im           # col2im where the output is small (adopted), the real loop of seed003, fast, best
    python benchmarks/probes.py col2im-step --model fast --steps 300   # the same, a bare step, alternating step by step
    python benchmarks/probes.py conv-pool-step --model fast --steps 300  # fast's space-to-depth, conv and pooling in one kernel
    python benchmarks/probes.py bn-relu          # kernels.BatchNormReLU (adopted): the real loop of fast, best, seed000
    python benchmarks/probes.py bn-relu-step --model fast --steps 300  # the same, a bare step, alternating step by step
    python benchmarks/probes.py conv-pool-build OLD.so   # the first layer's forward against another build of kernels.c
        # OLD.so: git show REV:src/mnistlab/kernels.c > /tmp/old.c; cc -O3 -march=native -fopenmp -fno-math-errno
        #         -fno-trapping-math -shared -fPIC -std=c11 /tmp/old.c -o /tmp/old.so (REV after 214b7b2: its signature)
Seventeenth pass:
    python benchmarks/probes.py winograd         # every convolution Winograd takes: oneDNN's forward and input gradient, or Winograd's
    python benchmarks/probes.py winograd-step --model M   # the same, a bare step, alternating step by step
    python benchmarks/probes.py winograd-igrad-step --model fast --steps 300   # a 4x4 output's input gradient: col2im or Winograd
Eighteenth pass:
    python benchmarks/probes.py winograd-pool-step [--model seed004]   # kernels.WinogradPoolReLU: Winograd and the pooling in one pass
    python benchmarks/probes.py winograd-pool-eval   # the same in evaluation: seed003, seed004 at batch 1000
    python benchmarks/probes.py winograd-tiles   # every convolution Winograd takes: forward by F(2x2, 3x3) or F(3x3, 3x3)
Nineteenth pass:
    python benchmarks/probes.py pooled-tiles-eval   # the pooled pass by F(4x4, 3x3) tiles or F(2x2, 3x3) alone, batch 1000
    python benchmarks/probes.py pooled-tiles-step [--model seed004]   # the same, a bare step
Twentieth pass:
    python benchmarks/probes.py chain-eval   # evaluation with the first layers as one call (adopted) or layer by layer
Twenty-first pass:
    python benchmarks/probes.py strided-convs   # best's 5x5 stride-2 convolutions (oneDNN), fp32, each part alone, and MKL's sgemm

`bn` takes `best` runs trained with --val-split 0.05 --seed 0 (it reports errors on that split and
on the test set). Timings are medians of rounds in one process; these CPUs are noisy.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import data, devices, kernels, models
from mnistlab.config import RECIPES
from mnistlab.evaluate import predict_logits
from mnistlab.train import KERAS_LR, Loop, autocast, loss_fn, train_epoch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PRECISION, make_loop  # noqa: E402  (a sibling script, not a package)


def bare_step(loop: Loop, x: torch.Tensor, y: torch.Tensor, with_optimizer: bool = True) -> None:
    """One training step on one batch, PRECISION + channels_last, nothing else: forward, loss, backward, update."""
    with autocast(x.device, PRECISION):
        logits = loop.train_net(x)
    loop.optimizer.zero_grad(set_to_none=True)
    loss_fn(logits, y, loop.config).backward()
    if with_optimizer:
        loop.optimizer.step()


class WherePool(torch.autograd.Function):
    """2x2 max pooling, stride 2, on a channels_last tensor with even height and width. The forward
    keeps the first maximum's position (0-3, uint8); the backward writes the whole input gradient in
    one `where`, with no zero pass. Equal to F.max_pool2d bit for bit, ties included."""

    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        x6 = x.permute(0, 2, 3, 1).view(n, h // 2, 2, w // 2, 2, c)
        a, b, c_, d = x6[:, :, 0, :, 0], x6[:, :, 0, :, 1], x6[:, :, 1, :, 0], x6[:, :, 1, :, 1]
        ab, cd = a >= b, c_ >= d  # ties go to the first, as in ATen's kernel
        top, bottom = torch.where(ab, a, b), torch.where(cd, c_, d)
        upper = top >= bottom
        ctx.save_for_backward(torch.where(upper, (~ab).to(torch.uint8), 2 + (~cd).to(torch.uint8)))
        ctx.shape = x.shape
        return torch.where(upper, top, bottom).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        (position,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        k = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8).view(1, 1, 2, 1, 2, 1)
        g6 = grad.permute(0, 2, 3, 1)[:, :, None, :, None]
        gi = torch.where(position[:, :, None, :, None] == k, g6, torch.zeros((), dtype=grad.dtype))
        return gi.view(n, h, w, c).permute(0, 3, 1, 2)


def ms_per_call(fn, repeats: int = 200) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def maxpool() -> None:
    print("| dtype | pooling | forward ms | forward + backward ms | equal to F.max_pool2d |\n|---|---|---:|---:|---|")
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        x0 = ((torch.randn(64, 32, 26, 26) * 2).round() / 2).to(dtype)  # rounded: many ties
        x0[:, :, :8] = 0.25  # a flat region, as a digit's background gives
        x0 = x0.contiguous(memory_format=torch.channels_last)
        g = torch.randn(64, 32, 13, 13).to(dtype).contiguous(memory_format=torch.channels_last)
        results = {}
        for name, pool in (("F.max_pool2d", lambda t: F.max_pool2d(t, 2)), ("WherePool", WherePool.apply),
                           ("kernels.MaxPoolReLU(relu=False)", kernels.MaxPoolReLU(relu=False))):
            x = x0.clone().requires_grad_()
            out = pool(x)
            out.backward(g)
            results[name] = (out.detach(), x.grad)

            def both():
                x.grad = None
                pool(x).backward(g)
            with torch.no_grad():
                forward = ms_per_call(lambda: pool(x))
            equal = all(torch.equal(a, b) for a, b in zip(results[name], results["F.max_pool2d"]))
            print(f"| {str(dtype)[6:]} | {name} | {forward:.3f} | {ms_per_call(both):.3f} | {equal} |")


def first_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` training images (as the model's input) and labels: the one batch a step probe repeats."""
    train = data.load("mnist", "train")
    return models.to_input(train.images[:size]), train.labels[:size].long()


def step() -> None:
    loop = make_loop("seed003", 64, PRECISION, True, 12_800)
    x, y = first_batch(64)
    bare_step(loop, x, y)  # every parameter has a gradient from here on
    parts = {"whole step": lambda: bare_step(loop, x, y), "without optimizer.step": lambda: bare_step(loop, x, y, False),
             f"optimizer.step alone ({type(loop.optimizer).__module__.split('.')[0]})": loop.optimizer.step,
             "torch.optim.RMSprop.step alone": torch_rmsprop_of(loop).step}
    rounds = {name: [] for name in parts}
    for _ in range(5):
        for name, fn in parts.items():
            rounds[name].append(ms_per_call(fn))
    print(f"| seed003, batch 64, {PRECISION} + channels_last | ms, median of 5 rounds of 200 | each round |\n|---|---:|---|")
    for name, times in rounds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {', '.join(f'{t:.3f}' for t in times)} |")


def recalibrated(net: nn.Module, images: torch.Tensor, batch: int = 500) -> nn.Module:
    """A copy whose BatchNorm running statistics are the plain average over `images` (weights unchanged)."""
    net = copy.deepcopy(net).eval()
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            net(models.to_input(images[i:i + batch]))
    return net.eval()


def bn(runs: list[Path]) -> None:
    train, test = data.load("mnist", "train"), data.load("mnist", "test")
    train_images, _, val_images, val_labels = data.train_val_split(train.images, train.labels, 0.05, 0)
    errors = lambda net, images, labels: int((predict_logits(net, images).argmax(1) != labels).sum())
    print("| run | validation errors | recalibrated | test errors | recalibrated |\n|---|---:|---:|---:|---:|")
    for run in runs:
        net = models.load_model(run)[0].to(memory_format=torch.channels_last).eval()
        fresh = recalibrated(net, train_images)
        print(f"| {run} | {errors(net, val_images, val_labels)} | {errors(fresh, val_images, val_labels)} | "
              f"{errors(net, test.images, test.labels)} | {errors(fresh, test.images, test.labels)} |")


def multiply_adds(net: nn.Module) -> int:
    """Multiply-adds of one 28x28 image through the convolutions and dense layers."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
    hooks = [m.register_forward_hook(count) for m in net.modules()]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return total


def macs() -> None:
    widths = [1, 32, 64, 96, 128, 160]
    five_by_five = nn.Sequential(*[layer for c_in, c_out in zip(widths, widths[1:])
                                   for layer in (nn.Conv2d(c_in, c_out, 5), nn.BatchNorm2d(c_out), nn.ReLU())],
                                 nn.Flatten(), nn.Linear(160 * 8 * 8, 10))
    best, big = multiply_adds(models.create_model("best")), multiply_adds(five_by_five)
    print(f"best: {best / 1e6:.1f}M multiply-adds per image; 5x5 Conv 32-64-96-128-160, no pooling: "
          f"{big / 1e6:.1f}M ({big / best:.1f}x)")


def use_nn_dropout(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.__class__ = nn.Dropout  # same rate and state; nn.Dropout's forward (bernoulli_)
    return net


def relu_inplace(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = True
    return net


def compile_pooling(net: nn.Sequential) -> nn.Sequential:
    """Each max pooling, with the ReLU the training order puts after it, through torch.compile."""
    layers = list(aten_pooling(net))
    for i, m in enumerate(layers):
        if isinstance(m, nn.MaxPool2d):
            j = i + 2 if i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU) else i + 1
            layers[i:j] = [torch.compile(nn.Sequential(*layers[i:j]))] + [nn.Identity()] * (j - i - 1)
    return nn.Sequential(*layers)


def aten_pooling(net: nn.Sequential) -> nn.Sequential:
    """The training net with ATen's pooling (and a separate ReLU) where it has the fused kernel (also inside a
    ConvPoolReLU or WinogradPoolReLU)."""
    unfused = lambda m: [nn.MaxPool2d(2), nn.ReLU()][:1 + m.relu] if isinstance(m, kernels.MaxPoolReLU) else [m]
    return nn.Sequential(*[layer for m in conv_then_pool(pool_after_conv(net)) for layer in unfused(m)])


def conv_then_pool(net: nn.Sequential) -> nn.Sequential:
    """The training net with oneDNN's first convolution, then the pooling kernel, where it has kernels.ConvPoolReLU
    (after a space-to-depth, the convolution a kernels.PatchMatmulConv, as before the blocks' version)."""
    def apart(m):
        if not isinstance(m, kernels.ConvPoolReLU):
            return [m]
        return [m.conv, m.pool] if m.space_to_depth is None else [m.space_to_depth, kernels.PatchMatmulConv(m.conv), m.pool]
    return nn.Sequential(*[layer for m in net for layer in apart(m)])


def pool_after_conv(net: nn.Sequential) -> nn.Sequential:
    """The training net with the convolution, then the pooling kernel, where it has kernels.WinogradPoolReLU."""
    return nn.Sequential(*[layer for m in net for layer in ([m.conv, m.pool] if isinstance(m, kernels.WinogradPoolReLU)
                                                            else [m])])


def onednn_convs(net: nn.Sequential) -> nn.Sequential:
    """The training net with oneDNN's convolutions (then the pooling kernel) where it has kernels.PatchMatmulConv."""
    return nn.Sequential(*[m.conv if isinstance(m, kernels.PatchMatmulConv) else m for m in pool_after_conv(net)])


def patch_convs_with(**options):
    """A change to the training net: each kernels.PatchMatmulConv (also inside a WinogradPoolReLU, which
    then runs it and the pooling apart unless its forward is still Winograd's) made again with `options`."""
    def remade(m):
        if isinstance(m, kernels.WinogradPoolReLU):
            return kernels.WinogradPoolReLU(remade(m.conv), m.pool, m.tile)
        return kernels.PatchMatmulConv(m.conv, **options) if isinstance(m, kernels.PatchMatmulConv) else m
    return lambda net: nn.Sequential(*map(remade, net))


without_native_wgrad = patch_convs_with(native=False)  # the weight gradient as before kernels.c's (section 4)


def pooled_by_2x2_tiles(net: nn.Sequential) -> nn.Sequential:
    """The training net with F(2x2, 3x3) tiles alone in each kernels.WinogradPoolReLU, as before F(4x4, 3x3)."""
    for m in net.modules():
        if isinstance(m, kernels.WinogradPoolReLU):
            m.tile = 2
    return net


def col2im_up_to_4x4(net: nn.Sequential) -> nn.Sequential:
    """The training net with col2im's input gradient up to 4x4 outputs, as before Winograd's took 4x4 over."""
    def remade(m):
        if isinstance(m, kernels.PatchMatmulConv):
            m = kernels.PatchMatmulConv(m.conv)
            m.COL2IM_OVER_WINOGRAD = m.SMALL_OUTPUT
        return m
    return nn.Sequential(*map(remade, pool_after_conv(net)))


def bn_then_relu(net: nn.Sequential) -> nn.Sequential:
    """The training net with torch's BatchNorm and ReLU where it has kernels.BatchNormReLU."""
    def apart(m):
        if not isinstance(m, kernels.BatchNormReLU):
            return [m]
        return [nn.ReLU(), m.bn] if m.relu_first else [m.bn, nn.ReLU()]
    return nn.Sequential(*[layer for m in net for layer in apart(m)])


without_col2im = patch_convs_with(col2im=False)  # oneDNN's input gradients where col2im would sum them


SIDE_BY_SIDE = {  # probe: (models by default, {variant: what it does to the training net}), the first the baseline
    "dropout": ("best,seed004,seed002,seed000", {"nn.Dropout": use_nn_dropout, "models.Dropout": lambda net: net}),
    "relu-inplace": ("fast,best,seed003", {"ReLU": lambda net: net, "ReLU(inplace=True)": relu_inplace}),
    "compile-pooling": ("seed003", {"eager": aten_pooling, "pooling compiled": compile_pooling}),
    "conv-pool": ("seed003,seed004", {"conv, then pooling": conv_then_pool, "one kernel": lambda net: net}),
    "fused-pooling": ("seed003,seed004,seed002,fast,seed000",
                      {"ATen pooling": aten_pooling, "fused pooling": conv_then_pool}),
    "patch-matmul": ("seed003,fast,best", {"oneDNN": onednn_convs, "patch matmul": without_native_wgrad}),
    "native-wgrad": ("seed003,fast,seed000,best", {"before": without_native_wgrad, "kernels.c weight gradient": lambda net: net}),
    "col2im": ("seed003,fast,best", {"oneDNN": without_col2im, "matmul + col2im": lambda net: net}),
    "bn-relu": ("fast,best,seed000", {"torch": bn_then_relu, "kernels.BatchNormReLU": lambda net: net}),
}


def side_by_side(probe: str, names: list[str], num_images: int, repeats: int) -> None:
    """Each model through the real loop (PRECISION + channels_last, its recipe's batch and augmentation), in
    each variant of the probe, rounds alternating after a warm-up round."""
    train = data.load("mnist", "train")
    images, labels = train.images[:num_images], train.labels[:num_images]
    variants = SIDE_BY_SIDE[probe][1]
    print(f"{num_images} images a pass, median of {repeats} rounds\n")
    print(f"| model | batch | {' | '.join(f'{v} images/s' for v in variants)} | ratio |\n"
          f"|---|---:|{'---:|' * len(variants)}---:|")
    for name in names:
        batch = RECIPES[name]["batch_size"]
        loops = {}
        for variant, change in variants.items():
            loops[variant] = make_loop(name, batch, PRECISION, True, num_images)
            loops[variant].train_net = change(loops[variant].train_net)
        rates = {variant: [] for variant in loops}
        for rnd in range(repeats + 1):
            for variant, loop in loops.items():
                loop.step = 0
                start = time.perf_counter()
                train_epoch(loop, images, labels, PRECISION)
                if rnd:  # round 0 warms up (and compiles)
                    rates[variant].append(num_images / (time.perf_counter() - start))
        medians = [statistics.median(r) for r in rates.values()]
        print(f"| {name} | {batch} | {' | '.join(f'{m:,.0f}' for m in medians)} | {medians[-1] / medians[0]:.2f}x |")


class FP32(nn.Module):
    """A layer run in fp32 inside a bf16 autocast step (its input cast up, autocast off)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def convs_in_fp32(*which: int):
    def change(net: nn.Sequential) -> nn.Sequential:
        layers = list(onednn_convs(conv_then_pool(net)))  # every convolution a plain Conv2d, as in the ninth pass
        positions = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
        for k in which:
            layers[positions[k]] = FP32(layers[positions[k]])
        return nn.Sequential(*layers)
    return change


def on_net(change):
    """A change to the training net, as a change to the loop."""
    return lambda loop: setattr(loop, "train_net", change(loop.train_net))


def torch_rmsprop_of(loop: Loop) -> torch.optim.RMSprop:
    """torch's foreach RMSprop with the settings of the loop's kernels.RMSprop, on the same parameters."""
    group = loop.optimizer.param_groups[0]
    return torch.optim.RMSprop(loop.net.parameters(), lr=group["lr"], alpha=group["alpha"], eps=group["eps"])


STEP_BY_STEP = {  # probe: {variant: what it does to a training loop (seed003's unless --model)}, the first the baseline
    "pooling-step": {"ATen pooling": on_net(aten_pooling), "fused pooling": on_net(conv_then_pool)},
    "conv-fp32": {"all bf16": on_net(convs_in_fp32()), "conv 1 fp32": on_net(convs_in_fp32(0)),
                  "conv 3 fp32": on_net(convs_in_fp32(2))},
    "rmsprop-step": {"torch RMSprop": lambda loop: setattr(loop, "optimizer", torch_rmsprop_of(loop)),
                     "native RMSprop": lambda loop: None},
    "conv3-matmul": {"oneDNN": on_net(onednn_convs), "conv 3 weight grad as matmul": lambda loop: None},
    "wgrad-step": {"before": on_net(without_native_wgrad), "kernels.c weight gradient": lambda loop: None},
    "col2im-step": {"oneDNN": on_net(without_col2im), "matmul + col2im": lambda loop: None},
    "bn-relu-step": {"torch": on_net(bn_then_relu), "kernels.BatchNormReLU": lambda loop: None},
    "conv-pool-step": {"conv, then pooling": on_net(conv_then_pool), "one kernel": lambda loop: None},
    "winograd-step": {"oneDNN": on_net(patch_convs_with(winograd=False)), "Winograd": lambda loop: None},
    "winograd-igrad-step": {"col2im up to 4x4": on_net(col2im_up_to_4x4), "Winograd from 4x4": lambda loop: None},
    "winograd-pool-step": {"Winograd, then pooling": on_net(pool_after_conv), "one pass": lambda loop: None},
    "pooled-tiles-step": {"F(2x2) pooled": on_net(pooled_by_2x2_tiles), "F(4x4) pooled": lambda loop: None},
}


def step_by_step(probe: str, name: str = "seed003", blocks: int = 3, steps: int = 1000) -> None:
    """A model's bare step (one batch of its recipe's size, PRECISION + channels_last) in each variant of the
    probe, alternating step by step, so a noisy minute slows all alike: median ms a step per block, and
    each variant's speed-up over the first."""
    batch = RECIPES[name]["batch_size"]
    x, y = first_batch(batch)
    loops = {}
    for variant, change in STEP_BY_STEP[probe].items():
        loops[variant] = make_loop(name, batch, PRECISION, True, 200 * batch)
        change(loops[variant])
    print(f"| block of {steps} steps | {' | '.join(f'{v} ms' for v in loops)} | speed-up |\n|---|{'---:|' * len(loops)}---|")
    for block in range(blocks):
        times = {variant: [] for variant in loops}
        for _ in range(steps):
            for variant, loop in loops.items():
                start = time.perf_counter()
                bare_step(loop, x, y)
                times[variant].append(time.perf_counter() - start)
        ms = [statistics.median(t[steps // 10:]) * 1e3 for t in times.values()]  # the first steps warm up
        print(f"| {block + 1} | {' | '.join(f'{m:.2f}' for m in ms)} | {', '.join(f'{ms[0] / m:.2f}x' for m in ms[1:])} |")


SEED003_CONVS = (64, [(1, 32, 28, 3, 1, 0), (32, 64, 13, 3, 1, 0), (64, 64, 5, 3, 1, 0)])  # batch; c_in, c_out, size, k, stride, padding
BEST_STRIDED_CONVS = (128, [(32, 32, 24, 5, 2, 2), (64, 64, 8, 5, 2, 2)])  # best's 5x5 stride-2 convolutions


def convs(shapes=SEED003_CONVS, dtypes=(torch.bfloat16, torch.float32), sgemm: bool = False) -> None:
    """Convolutions (seed003's three at batch 64 by default; channels_last), each part of the work timed alone:
    forward, input gradient and weight gradient, and for stride-1 bf16 ones the weight gradient as one matmul
    over the unfolded input. `sgemm`: MKL's 1024^3 matrix product too, in the same process, for scale.
    GFLOP/s count 2 per multiply-add."""
    backward = torch.ops.aten.convolution_backward
    batch, layers = shapes
    print("| input | dtype | forward ms | input grad ms | weight grad ms | GFLOP/s fwd / in / w | weight grad as matmul ms |\n"
          "|---|---|---:|---:|---:|---|---:|")
    for c_in, c_out, size, k, stride, pad in layers:
        for dtype in dtypes:
            x = torch.randn(batch, c_in, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c_out, c_in, k, k).to(dtype).contiguous(memory_format=torch.channels_last)
            g = F.conv2d(x, w, None, stride, pad)
            g = torch.randn_like(g).contiguous(memory_format=torch.channels_last)
            part = lambda mask: lambda: backward(g, x, w, [c_out], [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)
            times = [ms_per_call(lambda: F.conv2d(x, w, None, stride, pad)), ms_per_call(part([True, False, False])),
                     ms_per_call(part([False, True, False]))]
            flop = 2 * g.numel() * c_in * k * k
            matmul = "-"
            if dtype == torch.bfloat16 and (stride, pad) == (1, 0):
                def as_matmul():
                    columns = x.permute(0, 2, 3, 1).unfold(1, k, 1).unfold(2, k, 1).reshape(-1, c_in * k * k)
                    return g.permute(0, 2, 3, 1).reshape(-1, c_out).t() @ columns
                matmul = f"{ms_per_call(as_matmul):.3f}"
            print(f"| {list(x.shape)} k{k} s{stride} | {str(dtype)[6:]} | {' | '.join(f'{t:.3f}' for t in times)} | "
                  f"{' / '.join(f'{flop / t / 1e6:.0f}' for t in times)} | {matmul} |")
    if sgemm:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        t = ms_per_call(lambda: a @ b, repeats=50)
        print(f"\nMKL sgemm 1024^3 fp32: {t:.3f} ms, {2 * 1024 ** 3 / t / 1e6:.0f} GFLOP/s")


def weight_grad_of_patch_matmul(x, w, g, native: bool):
    """kernels._PatchMatmulConv's backward for the weight gradient alone (no input or bias gradient), called
    as autograd would call it: the matmul, or kernels.c's where `native`."""
    ctx = SimpleNamespace(saved_tensors=(x, w), has_bias=False, native=native,
                          needs_input_grad=(False, True, False, False))
    return lambda: kernels._PatchMatmulConv.backward(ctx, g)


def zoo_convs(names: tuple[str, ...], covered) -> list[tuple[str, int, nn.Conv2d, int]]:
    """(model, its recipe's batch, convolution, input size) for each plain convolution of the named models
    for which covered(conv) holds, in order."""
    found = []
    for name in names:
        net, seen = models.create_model(name).eval(), []
        for module in net.modules():
            if kernels.patchable(module) and covered(module):
                module.register_forward_hook(lambda m, inputs, _: seen.append((m, inputs[0].shape[-1])))
        net(torch.zeros(1, 1, 28, 28))
        found += [(name, RECIPES[name]["batch_size"], conv, size) for conv, size in seen]
    return found


def alternating(ways: list, calls: int, warm_up: int = 3) -> list[float]:
    """Median ms of each of `ways` over `calls` calls, the ways alternating call by call after `warm_up` rounds."""
    times = [[] for _ in ways]
    for rnd in range(calls + warm_up):
        for way, t in zip(ways, times):
            start = time.perf_counter()
            way()
            if rnd >= warm_up:
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def wgrads() -> None:
    """Every plain convolution of the zoo (no padding, stride 1, more than one input channel), at its
    recipe's batch in bf16 + channels_last (the tenth pass's setting): oneDNN's weight gradient against one
    matmul over the input's patches (what kernels.PatchMatmulConv does where the output is small)."""
    print("| model | convolution | input | output | batch | oneDNN ms | patch matmul ms | ratio |\n"
          "|---|---|---|---|---:|---:|---:|---:|")
    for name, batch, conv, size in zoo_convs(("seed003", "seed000", "seed004", "fast", "best"), lambda m: m.in_channels > 1):
        c_out, c_in, k, _ = conv.weight.shape
        out = size - k + 1
        x = torch.randn(batch, c_in, size, size).bfloat16().contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach().bfloat16().contiguous(memory_format=torch.channels_last)
        g = torch.randn(batch, c_out, out, out).bfloat16().contiguous(memory_format=torch.channels_last)
        onednn = lambda: torch.ops.aten.convolution_backward(g, x, w, [c_out], [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [False, True, False])
        patched = weight_grad_of_patch_matmul(x, w, g, native=False)
        a, b = ms_per_call(onednn, 100), ms_per_call(patched, 100)
        print(f"| {name} | {c_in}->{c_out}, {k}x{k} | {size}x{size} | {out}x{out} | {batch} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


def wgrad(repeats: int) -> None:
    """Every 3x3 convolution of the zoo that kernels.c's weight gradient covers, at its recipe's batch, fp32
    channels_last: oneDNN's weight gradient, the patch matmul and kernels.c's, the three alternating call
    by call after a warm-up, median ms of `repeats` calls each."""
    print("| model | convolution | output | batch | oneDNN ms | patch matmul ms | kernels.c ms | vs oneDNN | vs matmul | GFLOP/s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    covered = lambda m: kernels.native_weight_grad(torch.float32, m.weight)
    for name, batch, conv, size in zoo_convs(("seed003", "seed004", "seed000", "fast", "best"), covered):
        c_out, c_in, k, _ = conv.weight.shape
        out = size - k + 1
        # laid out as in the loop: a 1-channel tensor's .contiguous(channels_last) keeps NCHW's strides, and a
        # weight so strided sends oneDNN down its NCHW path, 6-12x slower for a first layer's weight gradient
        cl = lambda t: torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
        x, g = torch.randn(batch, c_in, size, size), cl(torch.randn(batch, c_out, out, out))
        x, w = (x if c_in == 1 else cl(x)), cl(conv.weight.detach())  # the loop's images: NCHW's strides
        onednn = lambda: torch.ops.aten.convolution_backward(g, x, w, [c_out], [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [False, True, False])
        a, b, c = alternating([onednn, weight_grad_of_patch_matmul(x, w, g, native=False),
                               weight_grad_of_patch_matmul(x, w, g, native=True)], repeats)
        flop = 2 * batch * out * out * c_in * c_out * k * k
        print(f"| {name} | {c_in}->{c_out} | {out}x{out} | {batch} | {a:.3f} | {b:.3f} | {c:.3f} | {a / c:.2f}x | "
              f"{b / c:.2f}x | {flop / c / 1e6:.0f} |")


def igrad(repeats: int) -> None:
    """Every plain convolution of the zoo that takes an input gradient (more than one input channel), at its
    recipe's batch, fp32 channels_last: oneDNN's input gradient against one matmul then kernels.c's col2im
    (what kernels.PatchMatmulConv does where the output is small), alternating call by call after a warm-up,
    median ms of `repeats` calls each."""
    print("| model | convolution | output | batch | oneDNN ms | matmul + col2im ms | ratio | oneDNN GFLOP/s | "
          "matmul + col2im GFLOP/s |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    cl = lambda t: torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    for name, batch, conv, size in zoo_convs(("seed003", "seed004", "seed000", "seed001", "fast", "best"),
                                             lambda m: m.in_channels > 1):
        c_out, c_in, k, _ = conv.weight.shape
        out = size - k + 1
        x, w, g = cl(torch.randn(batch, c_in, size, size)), cl(conv.weight.detach()), cl(torch.randn(batch, c_out, out, out))
        onednn = lambda: torch.ops.aten.convolution_backward(g, x, w, [c_out], [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, False, False])
        ctx = SimpleNamespace(saved_tensors=(x, w), has_bias=False, native=False, col2im=True, winograd_grad=False,
                              needs_input_grad=(True, False, False, False, False))
        a, b = alternating([onednn, lambda: kernels._PatchMatmulConv.backward(ctx, g)], repeats)
        flop = 2 * batch * out * out * c_in * c_out * k * k / 1e6
        print(f"| {name} | {c_in}->{c_out}, {k}x{k} | {out}x{out} | {batch} | {a:.3f} | {b:.3f} | {a / b:.2f}x | "
              f"{flop / a:.0f} | {flop / b:.0f} |")


def winograd(repeats: int) -> None:
    """Every convolution of the zoo that kernels.c's Winograd can take (fp32, 3x3, channels in 8s and 16s), at
    its recipe's batch, channels_last: oneDNN's forward and input gradient against Winograd's, alternating call
    by call after a warm-up, median ms of `repeats` calls each. GFLOP/s count a direct convolution's work."""
    print("| model | convolution | output | batch | forward: oneDNN ms | Winograd ms | ratio | input gradient: "
          "oneDNN ms | Winograd ms | ratio | oneDNN GFLOP/s | Winograd GFLOP/s |\n|---|---|---|---:|" + "---:|" * 8)
    cl = lambda t: torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    covered = lambda m: kernels.winograd(torch.float32, m.weight)
    for name, batch, conv, size in zoo_convs(("seed003", "seed004", "seed000", "seed001", "fast", "best"), covered):
        c_out, c_in, k, _ = conv.weight.shape
        out = size - k + 1
        x, w, g = cl(torch.randn(batch, c_in, size, size)), cl(conv.weight.detach()), cl(torch.randn(batch, c_out, out, out))
        forward = alternating([lambda: F.conv2d(x, w), lambda: kernels.winograd_conv(x, w, None)], repeats)
        onednn = lambda: torch.ops.aten.convolution_backward(g, x, w, [c_out], [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, False, False])
        backward = (alternating([onednn, lambda: kernels.winograd_input_grad(g, w, x.shape)], repeats)
                    if kernels.winograd(torch.float32, conv.weight.transpose(0, 1)) else [float("nan")] * 2)
        flop = 2 * batch * out * out * c_in * c_out * k * k / 1e6
        print(f"| {name} | {c_in}->{c_out}, 3x3 | {out}x{out} | {batch} | {forward[0]:.3f} | {forward[1]:.3f} | "
              f"{forward[0] / forward[1]:.2f}x | {backward[0]:.3f} | {backward[1]:.3f} | {backward[0] / backward[1]:.2f}x | "
              f"{flop / forward[0]:.0f}, {flop / backward[0]:.0f} | {flop / forward[1]:.0f}, {flop / backward[1]:.0f} |")


def winograd_tiles(repeats: int) -> None:
    """The same convolutions' forward by oneDNN, by Winograd's F(2x2, 3x3) and by its F(3x3, 3x3), at the
    recipe's batch (and seed003's at 1000, as evaluation runs), alternating call by call; which tile
    kernels.winograd_tile takes."""
    print("| model | convolution | output | batch | oneDNN ms | F(2x2) ms | F(3x3) ms | F(3x3) / F(2x2) | taken |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|")
    cl = lambda t: torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    convs = zoo_convs(("seed003", "seed004", "seed000", "seed001", "fast", "best"),
                      lambda m: kernels.winograd(torch.float32, m.weight))
    for name, batch, conv, size in convs + [("seed003", 1000, c, s) for n, _, c, s in convs if n == "seed003"]:
        c_out, c_in = conv.weight.shape[:2]
        x, w = cl(torch.randn(batch, c_in, size, size)), cl(conv.weight.detach())
        ms = alternating([lambda: F.conv2d(x, w), lambda: kernels.winograd_conv(x, w, None, tile=2),
                          lambda: kernels.winograd_conv(x, w, None, tile=3)], repeats)
        print(f"| {name} | {c_in}->{c_out}, 3x3 | {size - 2}x{size - 2} | {batch} | {ms[0]:.3f} | {ms[1]:.3f} | "
              f"{ms[2]:.3f} | {ms[1] / ms[2]:.2f}x | {kernels.winograd_tile(size - 2, size - 2)} |", flush=True)


def parts(name: str, steps: int = 300) -> None:
    """Where `name`'s training step goes (its recipe's batch, PRECISION + channels_last), timed by hooks on
    each layer's forward and each autograd node's backward: median ms a step over `steps` steps. The
    autograd profiler misplaces time on these cores (seed003's first convolution: 2.3-3.4 ms a step
    under the profiler, 0.3 ms by the clock); hooks add a little to each part, so the parts sum to
    more than a bare step (printed too, measured without hooks)."""
    batch = RECIPES[name]["batch_size"]
    loop = make_loop(name, batch, PRECISION, True, 64 * batch)
    x, y = first_batch(batch)
    bare = []
    for _ in range(steps):
        start = time.perf_counter()
        bare_step(loop, x, y)
        bare.append(time.perf_counter() - start)
    times: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def begin(key):
        return lambda *_: started.__setitem__(key, time.perf_counter()) and None

    def end(key):
        return lambda *_: times.setdefault(key, []).append(time.perf_counter() - started[key]) and None
    for k, module in enumerate(loop.train_net):
        key = f"forward {k}: {type(module).__name__}"
        module.register_forward_pre_hook(begin(key))
        module.register_forward_hook(end(key))
    for _ in range(steps):
        with autocast(x.device, PRECISION):
            logits = loop.train_net(x)
        loop.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(logits, y, loop.config)
        nodes, todo = [], [loss.grad_fn]
        while todo:  # every node of the graph once, from the loss back
            node = todo.pop()
            if node is not None and node not in nodes:
                nodes.append(node)
                todo += [nxt for nxt, _ in node.next_functions]
        for k, node in enumerate(nodes):
            key = f"backward {k}: {node.name()}"
            node.register_prehook(begin(key))
            node.register_hook(end(key))
        loss.backward()
        begin("optimizer step")()
        loop.optimizer.step()
        end("optimizer step")()
    print(f"{name}, batch {batch}: a bare step {statistics.median(bare) * 1e3:.2f} ms (median of {steps})\n")
    print("| part | ms a step |\n|---|---:|")
    for key, values in times.items():
        ms = statistics.median(values[steps // 5:]) * 1e3  # the first steps warm up
        if ms >= 0.02:
            print(f"| {key} | {ms:.3f} |")


def profile(name: str, nn_dropout: bool, steps: int = 50) -> None:
    """torch.profiler over `steps` training steps of `name` (its recipe's batch, PRECISION + channels_last,
    one batch repeated): self time per operator and input shape, the largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    batch = RECIPES[name]["batch_size"]
    loop = make_loop(name, batch, PRECISION, True, 64 * batch)
    if nn_dropout:
        use_nn_dropout(loop.train_net)
    x, y = first_batch(batch)
    for _ in range(20):
        bare_step(loop, x, y)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            bare_step(loop, x, y)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{name}, batch {batch}, {'nn.Dropout' if nn_dropout else 'models.Dropout'}: "
          f"{total / steps / 1e3:.2f} ms a step (profiled)\n")
    print("| operator | input shape | ms a step | share |\n|---|---|---:|---:|")
    for e in events[:15]:
        shape = next((s for s in e.input_shapes if s), "")
        print(f"| {e.key} | {shape} | {e.self_cpu_time_total / steps / 1e3:.3f} | {e.self_cpu_time_total / total:.0%} |")


def conv_pool_build(other: Path, calls: int = 50) -> None:
    """kernels.c's first-layer forward (conv_pool_forward) of this build against another build of it (a .so
    compiled from an earlier kernels.c with the same flags), at the zoo's first layers and batches: both
    must give the same bits; median ms of `calls` calls each, the builds alternating call by call."""
    import ctypes
    theirs = ctypes.CDLL(str(other))
    theirs.conv_pool_forward.argtypes = kernels.library().conv_pool_forward.argtypes
    print(f"| layer | batch | this build ms | {other.name} ms | speed-up |\n|---|---:|---:|---:|---:|")
    for label, n, c, k, blocks in (("seed003 3x3, 32", 64, 32, 3, 1), ("seed003 3x3, 32 (evaluation)", 1000, 32, 3, 1),
                                   ("seed004 3x3, 64", 64, 64, 3, 1), ("5x5, 32", 64, 32, 5, 1),
                                   ("fast 2x2 blocks, 3x3, 32", 256, 32, 3, 2)):
        x, w, b = torch.rand(n, 28, 28), torch.randn(c, k * blocks, k * blocks), torch.randn(c)
        size = ((28 - k * blocks) // blocks + 1) // 2
        outs = [(torch.empty(n, size, size, c), torch.empty(n, size, size, c, dtype=torch.uint8)) for _ in range(2)]
        args = lambda y, won: (x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), won.data_ptr(), n, 28, 28, c,
                               k * blocks, blocks, 1, 0)
        if theirs.conv_pool_forward(*args(*outs[1])):
            raise SystemExit(f"{other} has no first-layer kernel for {label}")
        a, b = alternating([lambda: kernels.library().conv_pool_forward(*args(*outs[0])),
                            lambda: theirs.conv_pool_forward(*args(*outs[1]))], calls, warm_up=5)
        assert all(torch.equal(a, b) for a, b in zip(*outs)), f"{label}: the builds disagree"
        print(f"| {label} | {n} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


LAYER_BY_LAYER = (kernels, "CHAIN_MIN_IMAGES", sys.maxsize)  # no kernels.chain_forward: each module's own forward


def eval_rates(names: list[str], variants: dict[str, list[tuple[object, str, object]]], rounds: int = 7) -> None:
    """Evaluation (predict_logits: the fused net, 10,000 test images at batch 1000, inference_mode) with each
    variant's attributes set (object, name, value; put back after), in fp32 and bf16, alternating round by
    round; the last two variants' ratio."""
    test = data.load("mnist", "test")
    print("| model | precision | " + " | ".join(f"{v} images/s" for v in variants) + " | ratio |\n|---|---|---:|---:|---:|")
    for name in names:
        torch.manual_seed(0)
        net = models.create_model(name).to(memory_format=torch.channels_last)
        for precision in ("fp32", "bf16") if PRECISION == "bf16" else ("fp32",):
            rates = {v: [] for v in variants}
            for _ in range(rounds):
                for variant, settings in variants.items():
                    kept = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in settings]
                    for owner, attr, value in settings:
                        setattr(owner, attr, value)
                    try:
                        with torch.inference_mode():
                            start = time.perf_counter()
                            predict_logits(net, test.images, batch_size=1000, precision=precision)
                            rates[variant].append(len(test.images) / (time.perf_counter() - start))
                    finally:
                        for owner, attr, value in kept:
                            setattr(owner, attr, value)
            (base, new) = (statistics.median(r) for r in list(rates.values())[-2:])
            print(f"| {name} | {precision} | {base:,.0f} | {new:,.0f} | {new / base:.2f}x |", flush=True)


def conv_pool_eval(names: list[str], fused: type = kernels.ConvPoolReLU, rounds: int = 7) -> None:
    """eval_rates with the `fused` module's (kernels.ConvPoolReLU's, or kernels.WinogradPoolReLU's) one native
    pass and with its convolution then the pooling kernel, layer by layer (the chain call would go past the
    forward swapped in)."""
    variants = {"conv, then pooling": lambda self, x: self.pool(self.conv(x)), "one kernel": fused.forward}
    eval_rates(names, {v: [(fused, "forward", f), LAYER_BY_LAYER] for v, f in variants.items()}, rounds)


def nproc_spread(optimizer: str, lr: float, seeds: list[int], limit_train: int) -> None:
    """tests/test_distributed.py's training in 1 process (1 thread) and in 2 (`--nproc 2`): the largest
    weight difference is what float rounding alone (sums in another order) grows into. Run again with
    MNISTLAB_KERNELS=0 for oneDNN alone."""
    import json
    import os
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    from mnistlab.train import TrainConfig, fit
    setting = dict(model="seed003", limit_train=limit_train, epochs=2, batch_size=32, precision="fp32",
                   optimizer=optimizer, lr=lr, rotation_range=10, width_shift_range=0.1, checkpoint_monitor="val_loss")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    print("| optimizer | lr | images | seed | max weight difference, 1 vs 2 processes | moved from the start | "
          "test accuracy |\n|---|---:|---:|---:|---:|---:|---:|")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            one, two = Path(tmp) / "one", Path(tmp) / "two"
            fit(TrainConfig(**setting, seed=seed, threads=1), out=one, progress=False)
            flags = [f"--{key.replace('_', '-')}={value}" for key, value in {**setting, "seed": seed}.items()]
            done = subprocess.run([sys.executable, "-m", "mnistlab", "train", *flags, "--nproc", "2", "--quiet",
                                   "--no-report", "--out", str(two)], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"probes.py nproc-spread: the 2-process run of seed {seed} failed:\n{done.stderr}")
            a, b = (load_file(out / "model.safetensors") for out in (one, two))
            accuracy = json.loads((one / "metrics.json").read_text())["test_accuracy"]
        torch.manual_seed(seed)  # as fit() does before it builds the model
        start = models.create_model("seed003", 10).state_dict()
        worst, moved = (max((x[k] - y[k]).abs().max().item() for k in a) for x, y in ((a, b), (a, start)))
        print(f"| {optimizer} | {lr:g} | {limit_train} | {seed} | {worst:.1e} | {moved:.1e} | {accuracy:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["maxpool", "step", "bn", "macs", "profile", "parts", "convs", "strided-convs", "wgrads", "wgrad", "igrad", "winograd", "conv-pool-build",
                                          "nproc-spread", "conv-pool-eval", "winograd-pool-eval", "pooled-tiles-eval", "chain-eval", "winograd-tiles", *STEP_BY_STEP, *SIDE_BY_SIDE])
    parser.add_argument("runs", nargs="*", help="for bn: runs trained with --val-split 0.05 --seed 0; "
                        "for profile and parts: one model")
    parser.add_argument("--models", help="for the side-by-side probes (default: each probe's own)")
    parser.add_argument("--model", default="seed003", choices=list(RECIPES),
                        help="for the step-by-step probes (default: seed003)")
    parser.add_argument("--steps", type=int, default=1000, help="for the step-by-step probes: steps a block")
    parser.add_argument("--images", type=int, default=6400, help="for the side-by-side probes: images a pass")
    parser.add_argument("--repeats", type=int, default=3, help="for the side-by-side probes")
    parser.add_argument("--nn-dropout", action="store_true", help="for profile: with nn.Dropout")
    parser.add_argument("--optimizer", default="sgd", choices=list(KERAS_LR), help="for nproc-spread")
    parser.add_argument("--lr", type=float, default=0.1, help="for nproc-spread")
    parser.add_argument("--limit-train", type=int, default=64, help="for nproc-spread: training images")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9", help="for nproc-spread: comma-separated")
    args = parser.parse_args()
    devices.reuse_freed_memory()  # as every mnistlab command does
    if args.probe == "bn" and not args.runs:
        raise SystemExit("probes.py bn: name the runs, e.g. runs/mix57k/member-1 (trained with --val-split 0.05 --seed 0)")
    if args.probe == "conv-pool-build" and len(args.runs) != 1:
        raise SystemExit("probes.py conv-pool-build: name one .so built from another kernels.c (see the docstring)")
    if args.probe in ("profile", "parts") and (len(args.runs) != 1 or args.runs[0] not in RECIPES):
        raise SystemExit(f"probes.py {args.probe}: name one model with a recipe: {', '.join(RECIPES)}")
    if args.probe in STEP_BY_STEP:
        step_by_step(args.probe, args.model, steps=args.steps)
    elif args.probe in SIDE_BY_SIDE:
        names = (args.models or SIDE_BY_SIDE[args.probe][0]).split(",")
        side_by_side(args.probe, names, args.images, args.repeats)
    else:
        {"maxpool": maxpool, "step": step, "convs": convs,
         "strided-convs": lambda: convs(BEST_STRIDED_CONVS, (torch.float32,), sgemm=True), "wgrads": wgrads, "wgrad": lambda: wgrad(args.repeats * 10),
         "igrad": lambda: igrad(args.repeats * 10), "winograd": lambda: winograd(args.repeats * 10),
         "winograd-tiles": lambda: winograd_tiles(args.repeats * 10), "bn": lambda: bn([Path(r) for r in args.runs]), "macs": macs,
         "profile": lambda: profile(args.runs[0], args.nn_dropout), "parts": lambda: parts(args.runs[0]),
         "conv-pool-eval": lambda: conv_pool_eval((args.models or "seed003,seed004").split(",")),
         "winograd-pool-eval": lambda: conv_pool_eval((args.models or "seed003,seed004").split(","),
                                                      kernels.WinogradPoolReLU),
         "pooled-tiles-eval": lambda: eval_rates((args.models or "seed003,seed004").split(","),
                                                 {"F(2x2) pooled": [(kernels, "POOLED_TILE", 2), LAYER_BY_LAYER],
                                                  "F(4x4) pooled": [LAYER_BY_LAYER]}),
         "chain-eval": lambda: eval_rates((args.models or "seed003,seed004").split(","),
                                          {"layer by layer": [LAYER_BY_LAYER], "one call": []}),
         "conv-pool-build": lambda: conv_pool_build(Path(args.runs[0])),
         "nproc-spread": lambda: nproc_spread(args.optimizer, args.lr, [int(s) for s in args.seeds.split(",")],
                                              args.limit_train)}[args.probe]()
    print("\ncommand: python benchmarks/probes.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
