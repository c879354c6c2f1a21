"""Faster CPU paths for training steps and evaluation: native kernels for 2x2 max pooling (with the
ReLU after it), for a first convolution together with the pooling after it (of one channel, or of a
space-to-depth's 2x2 blocks), for the RMSprop step, for an fp32 3x3 convolution's weight gradient, for
the input gradient of a convolution with a small output (one matmul, then col2im), for training-mode
BatchNorm with the ReLU beside it and for fp32 3x3 convolutions by Winograd's F(2x2, 3x3), forward and
input gradient; and convolutions whose weight gradient is one matmul.

ATen's max pooling was the largest cost in a seed003 step outside the convolutions: its backward
zeroes the whole input gradient before scattering into it, and its forward keeps 64-bit indices.
`kernels.c` does the same pooling in one pass each way (results equal bit for bit; see its header).
torch's RMSprop (it has no fused version) makes six passes over the parameters, each a thread-pool
dispatch per tensor; `kernels.c` makes one, the same arithmetic with a correctly rounded square root
(seed003's step 1.05x faster). A first convolution (one input channel) wrote an output 4x the
pooled one for the pooling to read back; `kernels.c` convolves, pools and applies the ReLU in one
pass, and computes the weight gradient from the pooled gradient (seed003's step 1.09-1.18x faster).
oneDNN's fp32 weight gradient ran well under its forward's speed on an AVX2 CPU; `kernels.c` sums it
with the running sums in registers (the zoo's fp32 steps 1.02-1.19x faster). Its input gradient ran at
22-67 GFLOP/s for small outputs, where a matmul then `kernels.c`'s col2im runs 1.2-3.3x faster;
torch's BatchNorm then ReLU make three passes each way where `kernels.c` makes two; and Winograd needs 16
multiplications for each 2x2 block of outputs where oneDNN's direct convolution needs 36 (the zoo's
forwards 1.1-2.0x faster, input gradients 1.4-2.2x, on two AVX2 cores).
The kernels are built once per machine with the C compiler (`$CC`, else `cc`) and OpenMP, into the
cache (`<cache>/kernels/`, one file per source, flags and CPU), and called through ctypes; they share
torch's OpenMP threads, so `torch.set_num_threads` governs them too. Where they cannot be built or
loaded (no compiler, not Linux, torch without OpenMP), or with MNISTLAB_KERNELS=0, mnistlab uses
`F.conv2d`, `F.max_pool2d`, `F.relu`, torch's BatchNorm and RMSprop, which give the same results (the
convolutions', the gradients', BatchNorm's and RMSprop's to a rounding), slower (a one-line note says
why).
`PatchMatmulConv`'s matmul needs no compiler: it is plain torch.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .data import cache_dir
from .errors import MnistlabError

SOURCE = Path(__file__).with_name("kernels.c")
# The second where -march=native is refused. C11 (-std=c11) keeps a * b + c two roundings, as torch's kernels
# round; -fno-math-errno lets sqrtf vectorize (its argument is never negative here); -fno-trapping-math (no
# floating-point exceptions are read; results unchanged) lets a choice between two computed values vectorize.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
             ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"])
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def cpu_fingerprint() -> str:
    """The CPU's feature flags, so a cache shared by different machines never runs another CPU's build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def openmp_runtimes() -> set[str]:
    """Files of OpenMP runtimes mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps if any(name in line.rsplit("/", 1)[-1] for name in OPENMP_RUNTIMES)}


def build(source: Path = SOURCE) -> Path:
    """The compiled kernel in the cache, compiled first if missing (to a temporary file, then renamed
    into place, so processes building at once never load half a file). Raises RuntimeError."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    text, cpu = source.read_bytes(), cpu_fingerprint()

    def cached(flags: list[str]) -> Path:  # one file per source, flags, compiler and CPU
        key = hashlib.sha256("\0".join([text.hex(), *flags, compiler, cpu]).encode()).hexdigest()[:16]
        return cache_dir() / "kernels" / f"pool-{key}.so"
    targets = [(flags, cached(flags)) for flags in FLAG_SETS]
    for _, target in targets:  # an earlier build with any flag set, before compiling anything
        if target.exists():
            return target
    errors = []
    for flags, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-std=c11", str(source), "-o", tmp],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0])
        except subprocess.TimeoutExpired:
            errors.append("no result after 300 s")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with a one-line note on stderr saying why) where it cannot be used."""
    if os.environ.get("MNISTLAB_KERNELS", "1") == "0":
        return None
    if sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info():
        return None  # it would bring its own thread pool, fighting torch's for the cores
    try:
        before = openmp_runtimes()
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        print(f"mnistlab: note: the native kernels are not available ({e}); PyTorch's convolution, pooling and "
              f"RMSprop run instead, the same results to a rounding, slower. Install a C compiler with OpenMP "
              f"(gcc) or set CC for them, or set MNISTLAB_KERNELS=0 to hide this note", file=sys.stderr)
        return None
    if before and openmp_runtimes() != before:
        return None  # the compiler's OpenMP is not the one torch loaded: two thread pools would fight
    pointer, size = ctypes.c_void_p, ctypes.c_long
    for name in ("pool_forward_bf16", "pool_forward_f32"):
        getattr(lib, name).argtypes = [pointer, pointer, pointer, size, size, size, size, ctypes.c_int]
    for name in ("pool_backward_bf16", "pool_backward_f32"):
        getattr(lib, name).argtypes = [pointer, pointer, pointer, size, size, size, size]
    number = ctypes.c_float
    lib.rmsprop_step.argtypes = [pointer, pointer, pointer, pointer, size, number, number, number, number]
    flag = ctypes.c_int
    lib.conv_pool_forward.argtypes = [pointer] * 5 + [size] * 6 + [flag, flag]
    lib.conv_pool_backward.argtypes = [pointer] * 5 + [size] * 5 + [flag]
    lib.conv3_weight_grad.argtypes = [pointer] * 3 + [size] * 7
    lib.col2im.argtypes = [pointer] * 2 + [size] * 5
    lib.winograd3.argtypes = [pointer] * 5 + [size] * 5 + [flag, flag]
    lib.winograd3_input_grad.argtypes = [pointer] * 3 + [size] * 7
    lib.chain_forward.argtypes = [pointer] * 3 + [size] * 2 + [flag] + [pointer] * 5 + [flag, pointer] + [size] * 3
    lib.winograd_weights.argtypes = [pointer] * 2 + [size] * 2 + [flag, flag]
    lib.space_to_depth2.argtypes = [pointer] * 2 + [size] * 3
    lib.batchnorm_relu_forward.argtypes = [pointer] * 8 + [size] * 2 + [number, number, flag]
    lib.batchnorm_relu_backward.argtypes = [pointer] * 9 + [size] * 2 + [flag]
    return lib


def out_of_memory(what: str) -> MnistlabError:
    """A kernel's allocation failed: the one-line error the CLI prints (problem and fix)."""
    return MnistlabError(f"out of memory for {what}; free memory or use a smaller --batch-size")


SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


class _PoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        won = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        getattr(library(), f"pool_forward_{SUFFIX[x.dtype]}")(x.data_ptr(), y.data_ptr(), won.data_ptr(),
                                                               n, h, w, c, int(relu))
        ctx.save_for_backward(won)
        ctx.shape = x.shape
        return y

    @staticmethod
    @once_differentiable  # a second derivative through it is an error, never a silent zero
    def backward(ctx, grad_y: torch.Tensor):
        (won,) = ctx.saved_tensors
        return pool_backward(grad_y, won, ctx.shape), None


def pool_backward(grad_y: torch.Tensor, won: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """kernels.c's pooling backward: the gradient (channels_last, of the pooled input's `shape`) from the
    pooled output's gradient and which position won."""
    n, c, h, w = shape
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty((n, c, h, w), dtype=grad_y.dtype, memory_format=torch.channels_last)
    getattr(library(), f"pool_backward_{SUFFIX[grad_y.dtype]}")(grad_y.data_ptr(), won.data_ptr(),
                                                                 grad_x.data_ptr(), n, h, w, c)
    return grad_x


class MaxPoolReLU(nn.Module):
    """MaxPool2d(2), then a ReLU if `relu`: one native kernel each way on a channels_last CPU tensor
    of bf16 or fp32 (`F.max_pool2d` and `F.relu` otherwise, or where the kernel is not available)."""

    def __init__(self, relu: bool = True):
        super().__init__()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in SUFFIX and x.numel() > 0
                and x.is_contiguous(memory_format=torch.channels_last) and library() is not None):
            return _PoolReLU.apply(x, self.relu)
        x = F.max_pool2d(x, 2)
        return F.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def fusable(pool: nn.Module) -> bool:
    """A MaxPool2d the kernel computes: 2x2, stride 2, no padding, no dilation, floor mode, no indices."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode
            and not pool.return_indices)


class RMSprop(torch.optim.RMSprop):
    """torch.optim.RMSprop whose step is one native pass over all parameters (the same arithmetic, with
    a correctly rounded square root), where every parameter is a dense fp32 CPU tensor with a gradient
    of the same layout and the settings are the plain ones (no momentum, not centered, no weight decay,
    a float learning rate); torch's own step otherwise. Its state and state_dict are torch's."""

    @torch.no_grad()
    def step(self, closure=None):
        lib = library() if closure is None else None
        if lib is None or not all(self._plain(group) for group in self.param_groups):
            return super().step(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:  # as torch initialises it, so state_dicts stay interchangeable
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            pointers = lambda tensors: (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
            alpha = group["alpha"]
            lib.rmsprop_step(pointers(params), pointers([p.grad for p in params]),
                             pointers([s["square_avg"] for s in states]),
                             (ctypes.c_long * len(params))(*[p.numel() for p in params]), len(params),
                             group["lr"], alpha, 1 - alpha, group["eps"])
        return None

    def _plain(self, group: dict) -> bool:
        def dense_alike(p: torch.Tensor) -> bool:
            square = self.state[p].get("square_avg", p)
            return (p.device.type == "cpu" and p.dtype == p.grad.dtype == torch.float32 and not p.grad.is_sparse
                    and (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last))
                    and p.stride() == p.grad.stride() == square.stride() and square.dtype == torch.float32)
        return (not group["momentum"] and not group["centered"] and not group["weight_decay"]
                and not group["maximize"] and not group.get("capturable") and not group.get("differentiable")
                and isinstance(group["lr"], float)
                and all(dense_alike(p) for p in group["params"] if p.grad is not None))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of x computes in: autocast's where it is on, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def native_weight_grad(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether kernels.c's weight gradient (section 4) covers a convolution computing in `dtype`: fp32,
    3x3, an even number of input channels and a multiple of 16 output channels, or any input channels
    and a multiple of 32 outputs."""
    c_out, c_in, k_h, k_w = weight.shape
    return (dtype == torch.float32 and weight.device.type == "cpu" and (k_h, k_w) == (3, 3)
            and (c_in % 2 == 0 and c_out % 16 == 0 or c_out % 32 == 0) and library() is not None)


def winograd_transform(weight: torch.Tensor, transposed: bool = False, tile: int = 2) -> torch.Tensor:
    """kernels.c's transform of 3x3 weights [c_out, c_in, 3, 3]: u [16, c_in, c_out], or [16, c_out, c_in];
    for F(3x3, 3x3) (`tile` 3), u [25, c_in, c_out]; for the pooled F(4x4, 3x3) and its edges (`tile` 4),
    u [100, c_in, c_out] (4x4's 36 positions, 4x2's 24, 2x4's 24, 2x2's 16)."""
    c_out, c_in = weight.shape[:2]
    weight = weight.contiguous(memory_format=torch.channels_last)  # as the models keep it: no copy
    positions = {2: 16, 3: 25, 4: 100}[tile]
    u = torch.empty((positions, c_out, c_in) if transposed else (positions, c_in, c_out))
    library().winograd_weights(weight.data_ptr(), u.data_ptr(), c_in, c_out, tile, transposed)
    return u


def grad_wanted(*tensors: torch.Tensor | None) -> bool:
    """Whether a forward must keep what its backward needs: grad mode on and one of `tensors` needing a
    gradient (evaluation skips the autograd functions and their records)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kept(module: nn.Module, weight: torch.Tensor, key, make) -> torch.Tensor:
    """make(), a tensor made from `weight`, kept on `module` while the weight is the same tensor, unchanged, and
    `key` the same (evaluation: the same weights batch after batch)."""
    full_key = (weight.data_ptr(), weight._version, key)
    held = module.__dict__.get("_kept")
    if held is None or held[0] is not weight or held[1] != full_key:
        held = module.__dict__["_kept"] = (weight, full_key, make())
    return held[2]


def kept_transform(module: nn.Module, weight: torch.Tensor, tile: int) -> torch.Tensor:
    """winograd_transform(weight, tile=tile), kept (seed003's two took 0.1-0.2 ms a batch)."""
    return kept(module, weight, tile, lambda: winograd_transform(weight, tile=tile))


def winograd_tile(h_out: int, w_out: int) -> int:
    """The tile for an h_out x w_out output: 3 (F(3x3, 3x3)) where its products are at most 3/4 of F(2x2,
    3x3)'s, its transforms being dearer (seed003's 3x3 output, 24x24 ones), else 2."""
    products = lambda tile: -(-h_out // tile) * -(-w_out // tile) * (tile + 2) ** 2
    return 3 if products(3) <= 0.75 * products(2) else 2


POOLED_TILE = 4  # the pooled pass's tiles: F(4x4, 3x3) where they fit (seed003's evaluation 1.14x); 2: F(2x2, 3x3) only


def winograd_mode(pooled: bool, relu: bool) -> int:
    """kernels.c winograd3's `mode`: 1 the pooling, 2 a ReLU (after the pooling, if pooled)."""
    return int(pooled) + 2 * bool(relu)


def evaluated_by_winograd(x: torch.Tensor, paths: tuple | None, conv: nn.Conv2d) -> bool:
    """Whether `conv`'s forward of x by Winograd (`paths`: PatchMatmulConv.paths(x)) is an evaluation's: no
    gradient wanted (no autograd record, the weights' transform kept), fp32 parameters (read as they are)."""
    weight, bias = conv.weight, conv.bias
    return (paths is not None and paths[3] and not grad_wanted(x, weight, bias) and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32))


def winograd_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: MaxPoolReLU | None = None,
                  tile: int | None = None, won: bool = True, u: torch.Tensor | None = None,
                  relu: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """kernels.c's Winograd valid convolution (section 7), fp32, channels_last out, by F(2x2, 3x3) or F(3x3,
    3x3) (`tile` 2 or 3; by default winograd_tile's choice); with `pool`, pooled by it in the same pass (`tile`
    2, or 4: F(4x4, 3x3) where it fits; by default POOLED_TILE): the pooled output and which position won
    (for pool_backward; None unless `won`). `u`: the weights' transform for that tile, if already made.
    `relu`: a ReLU after the convolution (not pooled; the pooling's own `relu` after it)."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    tile = (tile or POOLED_TILE) if pool else tile or winograd_tile(h - 2, w - 2)
    x = x.contiguous(memory_format=torch.channels_last)  # alive through the call, as u
    u = winograd_transform(weight, tile=tile) if u is None else u
    bias = None if bias is None else bias.contiguous()
    h_out, w_out = (h - 2) // 2 if pool else h - 2, (w - 2) // 2 if pool else w - 2
    y = torch.empty((n, c_out, h_out, w_out), memory_format=torch.channels_last)
    won = torch.empty((n, h_out, w_out, c_out), dtype=torch.uint8) if pool and won else None
    if library().winograd3(x.data_ptr(), u.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                           None if won is None else won.data_ptr(), n, h, w, c_in, c_out,
                           winograd_mode(pool is not None, pool.relu if pool else relu), tile):
        raise out_of_memory("a Winograd convolution's buffers")
    return y if pool is None else (y, won)


def winograd_input_grad(grad: torch.Tensor, weight: torch.Tensor, shape: torch.Size,
                        nonzero: tuple[int, int] | None = None) -> torch.Tensor:
    """The input gradient (of `shape`, channels_last) of winograd_conv by kernels.c, from its output's
    channels_last `grad`; `nonzero`: the rows and columns of each image's `grad` that are not all zero
    (the first ones; default all)."""
    grad_x = torch.empty(shape, memory_format=torch.channels_last)
    ut = winograd_transform(weight, transposed=True)  # alive through the call
    if library().winograd3_input_grad(grad.data_ptr(), ut.data_ptr(), grad_x.data_ptr(), shape[0], shape[2],
                                      shape[3], shape[1], weight.shape[0], *(nonzero or grad.shape[2:])):
        raise out_of_memory("a Winograd input gradient's buffers")
    return grad_x


def winograd(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether kernels.c's Winograd convolution (section 7) covers a convolution computing in `dtype`: fp32,
    3x3, on CPU, a multiple of 8 input channels and of 16 output channels."""
    c_out, c_in, k_h, k_w = weight.shape
    return (dtype == torch.float32 and weight.device.type == "cpu" and (k_h, k_w) == (3, 3)
            and c_in % 8 == 0 and c_out % 16 == 0 and library() is not None)


class _PatchMatmulConv(torch.autograd.Function):
    """A valid, stride-1 convolution: forward oneDNN's or (`winograd_forward`) kernels.c's Winograd, the bias
    gradient a sum; the input gradient oneDNN's, or (`col2im`) one matmul whose shares kernels.c's col2im
    sums, or (`winograd_grad`) kernels.c's Winograd backwards; the weight gradient
    kernels.c's (fp32 3x3, `native`) or else one matmul over the input's k x k patches (a strided view of
    the channels_last input, gathered by reshape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, native: bool,
                col2im: bool, winograd_forward: bool, winograd_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.native, ctx.col2im, ctx.winograd_grad = bias is not None, native, col2im, winograd_grad
        return winograd_conv(x, weight, bias) if winograd_forward else F.conv2d(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return *conv_grads(ctx, *ctx.saved_tensors, grad), None, None, None, None


def conv_grads(ctx, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
               nonzero: tuple[int, int] | None = None) -> tuple:
    """The input, weight and bias gradients of _PatchMatmulConv's convolution (or None where `ctx` says they are
    not needed), by the paths `ctx` keeps (has_bias, native, col2im, winograd_grad). `nonzero`: the rows and
    columns of each image's `grad` that are not all zero, the first ones (a pooling's backward leaves an
    odd last row and column zero); kernels.c's passes skip the rest."""
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    grad = grad.contiguous(memory_format=torch.channels_last)
    grad_x = None
    if ctx.needs_input_grad[0] and ctx.col2im:
        cols = grad.permute(0, 2, 3, 1).reshape(-1, c_out) @ weight.permute(0, 2, 3, 1).reshape(c_out, -1)
        grad_x = torch.empty(x.shape, memory_format=torch.channels_last)
        library().col2im(cols.data_ptr(), grad_x.data_ptr(), n, h, w, c_in, k)
    elif ctx.needs_input_grad[0] and ctx.winograd_grad:
        grad_x = winograd_input_grad(grad, weight, x.shape, nonzero)
    elif ctx.needs_input_grad[0]:  # not asking oneDNN for the bias gradient: it then computes the weights' too
        grad_x = torch.ops.aten.convolution_backward(grad, x, weight, [c_out], [1, 1], [0, 0], [1, 1], False,
                                                     [0, 0], 1, [True, False, False])[0]
    grad_weight = None  # none for frozen weights (an input's saliency, say)
    if ctx.needs_input_grad[1]:
        x = x.contiguous(memory_format=torch.channels_last)
        if ctx.native:
            grad_weight = torch.empty_like(weight, memory_format=torch.channels_last)
            if library().conv3_weight_grad(x.data_ptr(), grad.data_ptr(), grad_weight.data_ptr(), n, h, w, c_in,
                                           c_out, *(nonzero or grad.shape[2:])):
                raise out_of_memory("a weight gradient's sums")
        else:
            ho, wo = h - k + 1, w - k + 1
            patches = x.as_strided((n, ho, wo, k, k, c_in), (h * w * c_in, w * c_in, c_in, w * c_in, c_in, 1))
            grad_weight = grad.permute(0, 2, 3, 1).reshape(-1, c_out).t() @ patches.reshape(-1, k * k * c_in)
            grad_weight = grad_weight.view(c_out, k, k, c_in).permute(0, 3, 1, 2)  # channels_last, as the weight
    bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, bias


class PatchMatmulConv(nn.Module):
    """A plain Conv2d (shared: same parameters) whose gradients, on CPU, are computed by mnistlab. The
    weight gradient: in fp32 for 3x3 kernels, kernels.c's (`native_weight_grad`; on two AVX2 cores 1.2-2.7x
    oneDNN's, the zoo's training steps 1.02-1.19x faster: `benchmarks/probes.py wgrad`, `wgrad-step`); else,
    where the output is small, one matmul over input patches; `conv` itself otherwise. oneDNN's weight
    gradient is slow for small outputs: with bf16 the matmul was 2.55x faster at a 3x3 output, 2.24x at 2x2,
    7.0x at 1x1 and 1.28x at 4x4; from 8x8 up, 0.42-1.41x (`benchmarks/probes.py wgrads`). The input
    gradient, in fp32 where the output is small: one matmul, then kernels.c's col2im (`col2im_input_grad`;
    1.2-3.3x oneDNN's on two AVX2 cores, `benchmarks/probes.py igrad`). In fp32, the forward and, for
    outputs over 3x3, the input gradient: kernels.c's Winograd convolution (`winograd`; up to 3x3 col2im
    was as fast or faster). Under autocast it casts as F.conv2d would. `native=False`, `col2im=False` and
    `winograd=False` leave out kernels.c's (for the benchmarks). `relu`: a ReLU after it (models.fused sets
    it), in evaluation by Winograd's pass itself."""

    SMALL_OUTPUT = 16  # output positions (4x4) up to which the matmuls are used
    COL2IM_OVER_WINOGRAD = 9  # output positions (3x3) up to which col2im's input gradient beats Winograd's
    WINOGRAD_MIN_TILES = 8  # 2x2 tiles from which a training step's Winograd forward pays for its weights' transform

    def __init__(self, conv: nn.Conv2d, native: bool = True, col2im: bool = True, winograd: bool = True,
                 relu: bool = False):
        super().__init__()
        self.conv, self.native, self.col2im, self.winograd, self.relu = conv, native, col2im, winograd, relu

    def paths(self, x: torch.Tensor) -> tuple[torch.dtype, bool, bool, bool, bool] | None:
        """How _PatchMatmulConv computes `conv(x)`: the dtype and its flags native, col2im, winograd_forward and
        winograd_grad; None where `conv` itself does better."""
        conv = self.conv
        k_h, k_w = conv.kernel_size
        outputs = (x.shape[-2] - k_h + 1) * (x.shape[-1] - k_w + 1) if x.dim() == 4 else 0
        if x.device.type != "cpu" or outputs <= 0:
            return None
        dtype = compute_dtype(x)
        native = self.native and torch.is_grad_enabled() and native_weight_grad(dtype, conv.weight)
        tiles = x.shape[0] * -(-(x.shape[-2] - k_h + 1) // 2) * -(-(x.shape[-1] - k_w + 1) // 2)
        winograd_forward = (self.winograd and winograd(dtype, conv.weight)  # in evaluation its transform is kept
                            and (tiles >= self.WINOGRAD_MIN_TILES or not grad_wanted(x, conv.weight, conv.bias)))
        if not native and not winograd_forward and outputs > self.SMALL_OUTPUT:
            return None
        winograd_grad = winograd_forward and winograd(dtype, conv.weight.transpose(0, 1))  # the channels swapped
        col2im = (self.col2im and outputs <= self.SMALL_OUTPUT and col2im_input_grad(dtype, conv.weight)
                  and not (winograd_grad and outputs > self.COL2IM_OVER_WINOGRAD))
        return dtype, native, col2im, winograd_forward, winograd_grad and not col2im

    def evaluation(self, x: torch.Tensor, paths: tuple | None) -> tuple[torch.Tensor, int, int] | None:
        """Its forward of x as one evaluation pass by Winograd (`paths`: self.paths(x)): the kept weights'
        transform, the tile and winograd3's mode; None where it runs otherwise."""
        if not evaluated_by_winograd(x, paths, self.conv):
            return None
        tile = winograd_tile(x.shape[-2] - 2, x.shape[-1] - 2)
        return kept_transform(self, self.conv.weight, tile), tile, winograd_mode(False, self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self.paths(x)
        if paths is None:
            return F.relu(self.conv(x)) if self.relu else self.conv(x)
        dtype, *flags = paths
        weight, bias = self.conv.weight, self.conv.bias
        evaluation = self.evaluation(x, paths)
        if evaluation:
            u, tile, _ = evaluation
            return winograd_conv(x, weight, bias, tile=tile, u=u, relu=self.relu)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            y = _PatchMatmulConv.apply(x.to(dtype), weight.to(dtype), bias, *flags)
        return F.relu(y) if self.relu else y


class _WinogradPoolReLU(torch.autograd.Function):
    """winograd_conv pooled by a MaxPoolReLU in the same pass; backward: the pooling's, then conv_grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, pool: MaxPoolReLU, tile: int | None, native: bool, col2im: bool,
                winograd_grad: bool):
        y, won = winograd_conv(x, weight, bias, pool, tile)
        ctx.save_for_backward(x, weight, won)
        ctx.has_bias, ctx.native, ctx.col2im, ctx.winograd_grad = bias is not None, native, col2im, winograd_grad
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, won = ctx.saved_tensors
        n, _, h, w = x.shape
        grad = pool_backward(grad_y, won, (n, weight.shape[0], h - 2, w - 2))
        pooled = (grad_y.shape[2] * 2, grad_y.shape[3] * 2)  # the rows and columns the pooling read
        return *conv_grads(ctx, x, weight, grad, pooled), None, None, None, None, None


class WinogradPoolReLU(nn.Module):
    """A PatchMatmulConv and the MaxPoolReLU after it (shared: same parameters; seed003's and seed004's second
    convolution). Where the convolution runs forward by Winograd (fp32), each tile's 2x2 outputs are one
    pooling window: one native pass computes the pooled output and which position won, never writing the
    convolution's output, nor computing the tiles the pooling drops (an 11x11 output pools to 5x5: the
    10x10 it reads); the gradients skip them too (zero there). Its tiles (`tile`, by default POOLED_TILE):
    F(4x4, 3x3) where they fit (the 10x10 as 4, 4 and 2 rows by 4, 4 and 2 columns: 256 products a channel
    pair where F(2x2)'s 25 tiles take 400), within 67 units of fp32 rounding; or F(2x2, 3x3) alone, the same
    bits as that convolution then the pooling. The gradients are the same values either way, but for near
    ties in the pooling. `pool(conv(x))` otherwise."""

    def __init__(self, conv: PatchMatmulConv, pool: MaxPoolReLU, tile: int | None = None):
        super().__init__()
        self.conv, self.pool, self.tile = conv, pool, tile

    @staticmethod
    def pooled_pass(x: torch.Tensor, paths: tuple | None) -> bool:
        """Whether x goes through the one pooled pass (`paths`: the PatchMatmulConv's paths(x)): the convolution
        runs forward by Winograd (paths[3]) and x is at least 4x4 (one pooled 2x2 tile)."""
        return paths is not None and paths[3] and min(x.shape[-2:]) >= 4

    def evaluation(self, x: torch.Tensor, paths: tuple | None) -> tuple[torch.Tensor, int, int] | None:
        """Its forward of x as one evaluation pass (`paths`: self.conv.paths(x)): the kept weights' transform,
        the tile and winograd3's mode; None where it runs otherwise."""
        if not self.pooled_pass(x, paths) or not evaluated_by_winograd(x, paths, self.conv.conv):
            return None
        tile = self.tile or POOLED_TILE
        return kept_transform(self, self.conv.conv.weight, tile), tile, winograd_mode(True, self.pool.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self.conv.paths(x)
        if not self.pooled_pass(x, paths):
            return self.pool(self.conv(x))
        _, native, col2im, _, winograd_grad = paths
        weight, bias = self.conv.conv.weight, self.conv.conv.bias
        evaluation = self.evaluation(x, paths)
        if evaluation:  # no won
            u, tile, _ = evaluation
            return winograd_conv(x, weight, bias, self.pool, tile, won=False, u=u)[0]
        with torch.autocast("cpu", enabled=False):
            return _WinogradPoolReLU.apply(x, weight, bias, self.pool, self.tile, native, col2im, winograd_grad)


def col2im_input_grad(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether kernels.c's col2im (section 5) sums a convolution's input gradient: fp32, square kernels, on
    CPU (PatchMatmulConv uses it where the output is small)."""
    return (dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[2] == weight.shape[3]
            and library() is not None)


def patchable(conv: nn.Module) -> bool:
    """A Conv2d that PatchMatmulConv computes: no padding, stride 1, no dilation, one group."""
    return (type(conv) is nn.Conv2d and conv.padding in ("valid", (0, 0)) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def conv_pool_forward(x, weight, bias, relu: bool, dtype: torch.dtype, blocks: int = 1,
                      won: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The native forward: the pooled output (channels_last, in `dtype`) and each output's winning
    window position (uint8, for the backward; None unless `won`: 1.08x faster). With `blocks` 2 the
    convolution reads the image's 2x2 blocks of pixels as channels (space-to-depth): a k x k convolution of
    4 channels, done as a 2k x 2k one with stride 2 of the image itself."""
    n, _, h, w = x.shape
    c, k = weight.shape[0], weight.shape[-1]
    if blocks == 2:
        weight, h_in, w_in = F.pixel_shuffle(weight.detach(), 2).contiguous(), h // 2, w // 2
    else:
        h_in, w_in = h, w
    shape = (n, c, (h_in - k + 1) // 2, (w_in - k + 1) // 2)
    y = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    won = torch.empty((n, *shape[2:], c), dtype=torch.uint8) if won else None
    library().conv_pool_forward(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                y.data_ptr(), None if won is None else won.data_ptr(), n, h, w, c, k * blocks, blocks,
                                int(relu), int(dtype == torch.bfloat16))
    return y, won


class _ConvPoolReLU(torch.autograd.Function):
    """conv2d (valid, stride 1; of one input channel, or of the image's 2x2 blocks as 4 channels when
    `blocks` is 2), max_pool2d(2), then a ReLU if `relu`: the pooled output channels_last in `dtype` (bf16
    or fp32); gradients for the weight and bias, in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu: bool, dtype: torch.dtype, blocks: int) -> torch.Tensor:
        y, won = conv_pool_forward(x, weight, bias, relu, dtype, blocks)
        ctx.save_for_backward(x, won)
        ctx.weight_layout, ctx.has_bias, ctx.blocks = (weight.shape, weight.stride()), bias is not None, blocks
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, won = ctx.saved_tensors
        n, _, h, w = x.shape
        shape, stride = ctx.weight_layout
        c, k = shape[0], shape[-1]
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        if grad_y.dtype not in SUFFIX:
            grad_y = grad_y.float()
        if ctx.blocks == 2:  # the convolution's gradient (the pooling's backward), then its weight gradient
            return None, *blocks_weight_grad(x, grad_y, won, shape, ctx.has_bias), None, None, None
        grad_weight = torch.empty_strided(shape, stride)  # the weight's layout: [c, k, k] in memory either way
        grad_bias = torch.empty(c) if ctx.has_bias else None
        if library().conv_pool_backward(x.data_ptr(), grad_y.data_ptr(), won.data_ptr(), grad_weight.data_ptr(),
                                        0 if grad_bias is None else grad_bias.data_ptr(), n, h, w, c, k,
                                        int(grad_y.dtype == torch.bfloat16)):
            raise out_of_memory("a first layer's weight gradient")
        return None, grad_weight, grad_bias, None, None, None


def blocks_weight_grad(x, grad_y, won, shape, has_bias: bool):
    """The weight and bias gradients of a 3x3 convolution of the image's 2x2 blocks (fp32), from the pooled
    gradient: kernels.c's pooling backward gives the convolution's gradient, kernels.c's weight gradient
    (section 4) sums it against the blocks, laid out channels-last (a copy of 1/4 of the gradient's size)."""
    n, _, h, w = x.shape
    c = shape[0]
    grad = pool_backward(grad_y, won, (n, c, h // 2 - 2, w // 2 - 2))
    blocks = torch.empty((n, 4, h // 2, w // 2), memory_format=torch.channels_last)  # torch's copy: 1.2 ms for fast's
    library().space_to_depth2(x.data_ptr(), blocks.data_ptr(), n, h, w)
    grad_weight = torch.empty(shape, memory_format=torch.channels_last)
    if library().conv3_weight_grad(blocks.data_ptr(), grad.data_ptr(), grad_weight.data_ptr(), n, h // 2, w // 2, 4, c,
                                   *grad.shape[2:]):
        raise out_of_memory("a weight gradient's sums")
    return grad_weight, grad.sum((0, 2, 3)) if has_bias else None


class ConvPoolReLU(nn.Module):
    """A first convolution (one input channel; or, after a SpaceToDepth(2), the image's 2x2 blocks as 4
    channels) and the MaxPoolReLU after it (all shared: same parameters) as one native kernel each way,
    on CPU fp32 input that needs no gradient: the convolution's output, 4x the pooled one, never goes to
    memory, nor (for one channel) does its gradient (seed003's step 1.09-1.18x faster, `benchmarks/
    probes.py conv-pool-step`; its evaluation 1.23-1.40x, `conv-pool-eval`; fast's step 1.07-1.11x). It computes
    in fp32, where autocast would round the input and weights to bf16 first; under bf16 autocast its
    output is bf16, as the convolution's would be (the blocks' version: fp32 only). Training steps go
    through the autograd function, evaluation (no gradient wanted) calls the forward alone.
    `pool(conv(x))` (`pool(conv(space_to_depth(x)))`) otherwise."""

    def __init__(self, conv: nn.Conv2d, pool: MaxPoolReLU, space_to_depth: nn.PixelUnshuffle | None = None):
        super().__init__()
        self.conv, self.pool, self.space_to_depth = conv, pool, space_to_depth

    def native(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the native kernel computes `x`'s output in; None where it does not run."""
        conv, s2d = self.conv, self.space_to_depth
        k, blocks = conv.kernel_size[0], 1 if s2d is None else 2
        dtype = compute_dtype(x)
        weight = conv.weight
        if (not x.requires_grad  # no input gradient: it has no code for one
                and conv_poolable(conv, s2d) and x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == 1
                and x.dtype == torch.float32 and dtype in (SUFFIX if blocks == 1 else (torch.float32,))
                and x.shape[2] // blocks - k + 1 >= 2 and x.shape[3] // blocks - k + 1 >= 2
                and x.shape[2] % blocks == 0 and x.shape[3] % blocks == 0 and weight.dtype == torch.float32
                and (blocks == 2 or weight.stride()[0] == k * k and weight.stride()[2:] == (k, 1))  # [c, k, k] in memory
                and (conv.bias is None or conv.bias.dtype == torch.float32) and library() is not None):
            return dtype
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, s2d = self.conv, self.space_to_depth
        blocks, dtype = 1 if s2d is None else 2, self.native(x)
        if dtype is None:
            return self.pool(conv(x if s2d is None else s2d(x)))
        if grad_wanted(conv.weight, conv.bias):  # a training step
            return _ConvPoolReLU.apply(x.contiguous(), conv.weight, conv.bias, self.pool.relu, dtype, blocks)
        return conv_pool_forward(x.contiguous(), conv.weight, conv.bias, self.pool.relu, dtype, blocks,
                                 won=False)[0]  # evaluation


def conv_poolable(conv: nn.Module, space_to_depth: nn.Module | None = None) -> bool:
    """A Conv2d that ConvPoolReLU computes: no padding, stride 1, no dilation, a multiple of 16 output
    channels; one input channel, 3x3 or 5x5; or after `space_to_depth` (a PixelUnshuffle(2)), 4 input
    channels, 3x3."""
    if not (patchable(conv) and conv.out_channels % 16 == 0):
        return False
    if space_to_depth is None:
        return conv.in_channels == 1 and conv.kernel_size in ((3, 3), (5, 5))
    return (type(space_to_depth) is nn.PixelUnshuffle and space_to_depth.downscale_factor == 2
            and conv.in_channels == 4 and conv.kernel_size == (3, 3))


class _BatchNormReLU(torch.autograd.Function):
    """Training-mode batch_norm (updating `bn`'s running statistics) with a ReLU after it, or before it if
    `relu_first`: kernels.c's two passes each way, fp32, on a channels_last [n, c, h, w] or a [n, c] tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn: nn.Module, relu_first: bool) -> torch.Tensor:
        c = x.shape[1]
        y, mean, invstd = torch.empty_like(x), torch.empty(c), torch.empty(c)
        momentum = bn.momentum if bn.momentum is not None else 1 / (bn.num_batches_tracked.item() + 1)
        if library().batchnorm_relu_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                            mean.data_ptr(), invstd.data_ptr(), bn.running_mean.data_ptr(),
                                            bn.running_var.data_ptr(), x.numel() // c, c, bn.eps, momentum,
                                            int(relu_first)):
            raise out_of_memory("a batch normalisation's sums")
        bn.num_batches_tracked.add_(1)
        ctx.save_for_backward(x, y, mean, invstd, weight)
        ctx.relu_first = relu_first
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, y, mean, invstd, weight = ctx.saved_tensors
        c = x.shape[1]
        grad_y = grad_y.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = torch.empty(c), torch.empty(c)
        if library().batchnorm_relu_backward(grad_y.data_ptr(), x.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                             invstd.data_ptr(), weight.data_ptr(),
                                             0 if grad_x is None else grad_x.data_ptr(), grad_weight.data_ptr(),
                                             grad_bias.data_ptr(), x.numel() // c, c, int(ctx.relu_first)):
            raise out_of_memory("a batch normalisation's sums")
        return grad_x, grad_weight, grad_bias, None, None


class BatchNormReLU(nn.Module):
    """A BatchNorm2d (or BatchNorm1d) with the ReLU after it, or before it if `relu_first` (the BatchNorm
    shared: same parameters and running statistics). In training, on a CPU fp32 tensor laid out
    channels_last (or [n, c]), kernels.c's two passes each way where torch makes three and more
    dispatches (bare steps: fast's 1.04-1.08x faster, seed000's 1.03-1.05x, best's 1.01-1.04x; `benchmarks/
    probes.py bn-relu-step`); the same results to a rounding. `relu(bn(x))` (`bn(relu(x))`) otherwise,
    evaluation included."""

    def __init__(self, bn: nn.Module, relu_first: bool = False):
        super().__init__()
        self.bn, self.relu_first = bn, relu_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        layout = (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                  or x.dim() == 2 and x.is_contiguous())
        if (bn.training and type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
                and layout and x.device.type == "cpu" and x.dtype == bn.weight.dtype == torch.float32
                and x.shape[1] == bn.num_features and x.numel() > x.shape[1] and library() is not None):
            return _BatchNormReLU.apply(x, bn.weight, bn.bias, bn, self.relu_first)
        return bn(F.relu(x)) if self.relu_first else F.relu(bn(x))

    def extra_repr(self) -> str:
        return f"relu_first={self.relu_first}"


CHAIN_MIN_IMAGES = 64  # seed003 at 1-12 images 0.82-0.97x, 48-100 0.98-1.02x, 128 up 1.06-1.33x


def chain_forward(layers: list[nn.Module], x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """Evaluation through a ConvPoolReLU (one channel, no space-to-depth) and the Winograd forwards after it
    (WinogradPoolReLUs and PatchMatmulConvs, each where it would run by Winograd alone) in one call to
    kernels.c's chain_forward (section 8): blocks of images through all of them, their activations kept in
    the cores' caches (seed003's first three layers 1.22-1.26x at batch 1000), the same bits as the layers
    one by one. From CHAIN_MIN_IMAGES up: smaller batches fit the caches anyway, and a thread takes a whole
    block where the layers one by one share each image's rows between threads. How many of `layers` (from
    the first) it ran, and their output; (0, None) where it does not apply."""
    first = layers[0]
    if (type(first) is not ConvPoolReLU or first.space_to_depth is not None or x.dim() != 4
            or len(x) < CHAIN_MIN_IMAGES or grad_wanted(first.conv.weight, first.conv.bias)
            or first.native(x) != torch.float32):
        return 0, None
    n, (c, k) = x.shape[0], (first.conv.out_channels, first.conv.kernel_size[0])
    h, w = (x.shape[2] - k + 1) // 2, (x.shape[3] - k + 1) // 2
    steps = []  # each Winograd layer's u, bias, output channels, mode and tile
    for layer in layers[1:]:
        patch = layer.conv if type(layer) is WinogradPoolReLU else layer
        if type(patch) is not PatchMatmulConv or patch.conv.in_channels != c or len(steps) == 8:
            break
        probe = torch.empty(()).expand(n, c, h, w)  # its input's shape, not allocated
        evaluation = layer.evaluation(probe, patch.paths(probe))  # as its own forward would run
        if evaluation is None:
            break
        (u, tile, mode), bias = evaluation, patch.conv.bias
        steps.append((u, None if bias is None else bias.contiguous(), patch.conv.out_channels, mode, tile))
        c, h, w = patch.conv.out_channels, *(((h - 2) // 2, (w - 2) // 2) if mode & 1 else (h - 2, w - 2))
    if not steps:
        return 0, None
    y = torch.empty((n, c, h, w), memory_format=torch.channels_last)
    x = x.contiguous()  # [n, 1, h, w]: the images' rows
    array = lambda kind, values: (kind * len(values))(*values)
    us, biases, cs, modes, tiles = zip(*steps)
    pointers = [array(ctypes.c_void_p, [t.data_ptr() for t in us]),
                array(ctypes.c_void_p, [None if b is None else b.data_ptr() for b in biases]),
                array(ctypes.c_long, cs), array(ctypes.c_int, modes), array(ctypes.c_int, tiles)]
    bias = first.conv.bias
    if library().chain_forward(x.data_ptr(), first.conv.weight.data_ptr(), None if bias is None else bias.data_ptr(),
                               k, first.conv.out_channels, int(first.pool.relu), *pointers, len(steps), y.data_ptr(),
                               n, x.shape[2], x.shape[3]):
        raise out_of_memory("the first layers' buffers")
    return 1 + len(steps), y
