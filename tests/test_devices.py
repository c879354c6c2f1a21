"""Devices: how `auto` chooses, clear errors for absent devices and precisions, and (on a CUDA machine)
training on the GPU: data and augmentation there, bf16/fp16, no host sync per step, results that
evaluate on the CPU."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from mnistlab import devices
from mnistlab.augment import Augmentation, augment
from mnistlab.callbacks import Callback
from mnistlab.errors import MnistlabError
from mnistlab.evaluate import evaluate_run
from mnistlab.train import TrainConfig, fit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA not available: device tests run on GPU machines")


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    assert devices.resolve_device("auto") == torch.device(expected)


def test_an_absent_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MnistlabError, match="--device cuda: no CUDA GPU is visible.*--device cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(MnistlabError, match="unknown device 'tpu'"):
        fit(TrainConfig(device="tpu"), progress=False)


def test_fp16_is_for_cuda_and_auto_precision_follows_the_device():
    with pytest.raises(MnistlabError, match="fp16 trains on CUDA GPUs only.*bf16 or fp32 on cpu"):
        devices.resolve_precision("fp16", torch.device("cpu"))
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == ("bf16" if devices.bf16_supported(cpu) else "fp32")
    assert devices.resolve_precision("auto", torch.device("mps")) == "fp32"


STEPS_AND_FAULTS = """
import resource, torch
from mnistlab import models
from mnistlab.devices import reuse_freed_memory
from mnistlab.evaluate import predict_logits
assert reuse_freed_memory() == (__import__("os").environ["MNISTLAB_MALLOPT"] == "1")

net, x, y = models.create_model("seed003"), torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
optimizer = torch.optim.RMSprop(net.parameters())
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(60):
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
middle = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# seed004 at batch 3000: its activations pass glibc's largest mmap threshold (32 MB); seed003's at 1000 no longer
# do, nor seed004's (its first layers run as one call, their activations never a whole batch's)
net, images = models.create_model("seed004"), torch.randint(0, 256, (3000, 28, 28), dtype=torch.uint8)
for repeat in range(4):  # the first batches set up the heap either way (after two, 0-10k faults were still seen)
    predict_logits(net, images, batch_size=3000)
warm = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for repeat in range(3):
    predict_logits(net, images, batch_size=3000)
print(middle - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - warm)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is for glibc (Linux)")
def test_training_steps_and_inference_batches_reuse_freed_memory_instead_of_faulting_it_in_again():
    """glibc's defaults give each step's activations back to the kernel and fault them in again; the
    setting keeps them (a fresh process each: the setting is per process and glibc adapts over time).
    predict_logits makes the setting itself (the 1,000-image batches of evaluation)."""
    faults = {}
    for setting in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", STEPS_AND_FAULTS], capture_output=True, text=True, check=True,
                              env={**os.environ, "MNISTLAB_MALLOPT": setting, "OMP_NUM_THREADS": "1"})
        faults[setting] = [int(count) for count in done.stdout.split()]
    (train_on, infer_on), (train_off, infer_off) = faults["1"], faults["0"]
    assert train_on * 5 < train_off and infer_on * 5 < infer_off, faults


# --- On a CUDA GPU ------------------------------------------------------------------------------

TINY = dict(model="seed003", epochs=1, batch_size=32, limit_train=2000, seed=0, device="cuda")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_learns_and_evaluates_on_the_cpu(mnist_dir, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 (Ampere or newer has)")
    result = fit(TrainConfig(**TINY, precision=precision, rotation_range=10), out=tmp_path, data_dir=mnist_dir,
                 progress=False)
    assert next(result.net.parameters()).is_cuda
    assert result.metrics.test_accuracy > 0.7  # chance is 0.1
    again = evaluate_run(tmp_path, data_dir=mnist_dir)  # loads onto the CPU
    assert again.test_accuracy == pytest.approx(result.metrics.test_accuracy, abs=2e-3)


class FailOnHostSync(Callback):
    """Steps 1-48 run under CUDA's sync debug mode "error": a step that makes the host wait for the
    GPU raises. (Step 0 and every 50th step read the loss sum: the NaN check and the progress bar.)"""

    def on_train_batch_end(self, step, loop):
        if step == 0:
            torch.cuda.set_sync_debug_mode("error")
        elif step == 48:
            torch.cuda.set_sync_debug_mode("default")
            self.checked = True


@needs_cuda
def test_steps_on_cuda_never_wait_for_the_gpu(mnist_dir):
    guard = FailOnHostSync()
    try:
        fit(TrainConfig(**TINY, precision="fp32", rotation_range=10), data_dir=mnist_dir, progress=False,
            callbacks=[guard])
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError):  # the mode does catch a sync
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.checked


@needs_cuda
def test_augmentation_runs_on_the_generators_device():
    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.rand(8, 1, 28, 28, device="cuda")
    warped = augment(x, Augmentation(rotation_range=10, zoom_range=0.1), generator)
    assert warped.is_cuda and warped.shape == x.shape and not torch.equal(warped, x)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: NCCL tests run on multi-GPU machines")
def test_two_gpus_train_with_nccl(mnist_dir, tmp_path):
    from test_distributed import mnistlab
    done = mnistlab(["train", "--model", "seed003", "--epochs", "1", "--limit-train", "2000", "--device", "cuda",
                     "--nproc", "2", "--quiet", "--no-report", "--out", str(tmp_path / "run")], mnist_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert '"resolved_device": "cuda:0"' in (tmp_path / "run" / "config.json").read_text()
