"""Data-parallel training over several processes and machines with PyTorch's own engine: torchrun
starts the processes, DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPU).

The rules that make N processes train as one process does (to float rounding):
- Every process holds the whole data set and draws the same seeded permutation; step s's global
  batch is order[s*B:(s+1)*B] (B = --batch-size, the GLOBAL batch) and process r takes the r-th of
  N near-equal contiguous parts of it.
- Each process's loss is weighted by its share of the global batch, so DDP's mean of the N
  gradients is the single-process gradient, uneven last batches included: the learning rate
  needs no scaling with N.
- Augmentation draws the transforms of the whole global batch on every process (the generators
  share one seed) and keeps its part's: every image gets the transform it gets in one process.
  Dropout draws from torch's generator; rank r > 0 reseeds it with seed + 10000*r + epoch (rank 0
  keeps the single-process stream), so dropout masks differ from a single run's.
- The loss/accuracy sums are all-reduced and validation/test evaluation is sharded then
  all-reduced: every process sees the same logs, so the callbacks decide (and stop) alike.
- Only rank 0 writes files (config, resume.pt, checkpoints, run folder); the others wait at a
  barrier at the end.
- A process that fails notes when (launch() names the first to fail, not the peers that failed
  because it had gone) and exits at once (`__main__`), without tearing down a broken group.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .callbacks import Callback
from .devices import resolve_device
from .errors import MnistlabError
from .runfiles import atomic_write_text
from .evaluate import Metrics, evaluate as evaluate_one, predict_logits

# How long a process waits in a collective for the others. Every rank does the same work between
# collectives, so a wait longer than this means a peer hung or died: end the job instead of
# hanging. (A dead peer usually ends it within a second: gloo sees the closed connection and
# torchrun stops the others.)
TIMEOUT = timedelta(minutes=5)
CRASH_ENV = "MNISTLAB_TEST_CRASH"  # tests only: RANK:STEP makes that rank raise (see CrashForTests)
FAILURES_ENV = "MNISTLAB_FAILURES"  # set by launch(): a folder where each failing process notes when it failed


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The process that writes files and prints progress."""
    return rank() == 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """Threads per process when --threads is 0: the cores shared by this machine's processes (so two
    processes on two cores do not oversubscribe them); 0 (PyTorch's own default) in a single process."""
    if not launched():
        return 0
    return max(1, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))


@contextlib.contextmanager
def process_group(device_name: str):
    """For the duration of a run: join the job this process was launched into, if any, and yield the
    device to train on (cuda:LOCAL_RANK on a GPU machine)."""
    device = resolve_device(device_name)
    if not launched():
        yield device
        return
    if device.type == "mps":
        raise MnistlabError("several processes train on --device cpu or cuda; mps has no distributed backend")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():  # set up by the caller (Python API): theirs to end
        yield device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield device
    except BaseException:
        if os.environ.get(FAILURES_ENV):  # atomic: a process killed mid-write leaves no half note
            atomic_write_text(Path(os.environ[FAILURES_ENV], str(rank())), str(time.time_ns()))
        raise  # the group is left as it is: tearing it down with a collective cut short can abort
    dist.destroy_process_group()


def check_global_batch(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise MnistlabError(f"--batch-size {batch_size} is the global batch and must divide by the {processes} "
                            f"processes; pass a multiple of {processes}")


def check_batches(batch_size: int, num_images: int, batchnorm_values: int | None = None) -> None:
    """The global batch must split evenly, and even the last, partial batch needs an image per process;
    with BatchNorm (`batchnorm_values`: the fewest values a channel one image gives it, models.batchnorm_values),
    enough images that each process's share gives it two values a channel (PyTorch refuses one)."""
    n, last = world(), num_images % batch_size
    check_global_batch(batch_size, n)
    if 0 < last < n:
        raise MnistlabError(f"the last batch of an epoch has {last} image(s) for the {n} processes, "
                            "which need one each; change --batch-size or --limit-train")
    if batchnorm_values is not None and last and (last // n) * batchnorm_values < 2:
        processes = "" if n == 1 else f" for the {n} processes"
        raise MnistlabError(f"the last batch of an epoch has {last} image(s){processes}, too few for the model's "
                            "BatchNorm to train on (it needs two values a channel); change --batch-size or --limit-train")


def part(batch_len: int) -> slice:
    """This process's contiguous part of a global batch (all of it in a single process)."""
    r, n = rank(), world()
    return slice(r * batch_len // n, (r + 1) * batch_len // n)


def weigh(loss: torch.Tensor, local: int, total: int) -> torch.Tensor:
    """A process's mean loss over `local` of `total` images, weighted so that DDP's mean over the
    processes of their gradients is the gradient of the mean over the whole batch."""
    n = world()
    return loss if n == 1 else loss * (local * n / total)


def all_reduce_sum(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sums over all processes (copies; the inputs are unchanged)."""
    if world() == 1:
        return tensors
    summed = tuple(t.clone() for t in tensors)
    for t in summed:
        dist.all_reduce(t)
    return summed


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module training steps run through: DDP (which starts from rank 0's weights) in a job."""
    if world() == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def seed_dropout(seed: int, epoch: int) -> None:
    """Rank r > 0 draws its own dropout masks (rank 0 keeps a single run's generator)."""
    if rank():
        torch.manual_seed(seed + 10_000 * rank() + epoch)


def evaluate(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **options) -> Metrics:
    """evaluate.evaluate, sharded: each process scores its part, the sums are all-reduced."""
    if world() == 1:
        return evaluate_one(net, images, labels, **options)
    mine = part(len(labels))
    logits = predict_logits(net, images[mine], **options)
    sums = torch.stack([F.cross_entropy(logits, labels[mine], reduction="sum").double(),
                        (logits.argmax(1) == labels[mine]).sum().double()])
    dist.all_reduce(sums)
    loss, correct = sums.tolist()
    return Metrics(test_loss=loss / len(labels), test_accuracy=correct / len(labels), num_test=len(labels))


def barrier() -> None:
    if world() > 1:
        dist.barrier()


class CrashForTests(Callback):
    """Tests only: MNISTLAB_TEST_CRASH=RANK:STEP makes process RANK raise after step STEP (counted from 0
    over all epochs), as a crashing process would, to show the job then ends instead of hanging."""

    def __init__(self, spec: str):
        self.crash_rank, self.crash_step = map(int, spec.split(":"))

    def on_train_batch_end(self, step, loop):
        if rank() == self.crash_rank and loop.epoch * loop.steps_per_epoch + step == self.crash_step:
            raise RuntimeError(f"{CRASH_ENV}: rank {rank()} crashes at step {self.crash_step} on purpose")


def hooks_for_tests() -> list[Callback]:
    spec = os.environ.get(CRASH_ENV)
    return [CrashForTests(spec)] if spec else []


def launch(nproc: int, argv: list[str], out: Path) -> None:
    """`mnistlab train --nproc N ...`: the same command in N processes on this machine, under
    torchrun's elastic agent running in this process, as `torchrun --standalone --nproc-per-node N
    -m mnistlab train ...` would (the processes ignore --nproc). If one process fails, the agent
    stops the others and this raises one line naming the failed ranks."""
    import logging
    import shutil
    import tempfile
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // nproc)))  # torchrun would say 1
    # The agent's log lines (each module's logger has its own level) repeat what the one line below says.
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "mnistlab"])
    args.training_script_args = argv  # not through torchrun's parser: it would take --nproc for its own
    failures = Path(tempfile.mkdtemp(prefix="mnistlab-failures-"))
    os.environ[FAILURES_ENV] = str(failures)  # the processes inherit it
    try:
        run(args)
    except ChildFailedError as err:
        noted = {int(f.name): int(f.read_text()) for f in failures.glob("[0-9]*")}  # not a killed writer's temp file
        failed = ", ".join(f"rank {r} exited with code {f.exitcode}"
                           for r, f in sorted(causes(err.failures, noted).items()))
        raise MnistlabError(f"the {nproc}-process run failed: {failed} (see its message above); the other "
                            "processes were stopped") from None
    except SignalException as err:
        from .train import Interrupted
        raise Interrupted(f"the {nproc}-process run was stopped by signal {err.sigval}; once an epoch has finished, "
                          f"continue it with: mnistlab train --resume {out} --nproc {nproc}") from None
    finally:
        del os.environ[FAILURES_ENV]
        shutil.rmtree(failures, ignore_errors=True)


def causes(failures: dict, noted: dict[int, int]) -> dict:
    """The failed ranks that ended the job: any killed by a signal before it could note a failure (a
    segfault, the OOM killer), else the first to fail (noted: rank -> time in ns). Not the ones that
    failed because that peer had gone, nor those the agent stopped (SIGTERM)."""
    stopped = -signal.SIGTERM
    crashed = {r: f for r, f in failures.items() if f.exitcode < 0 and f.exitcode != stopped and r not in noted}
    first = min(noted, key=noted.get) if noted else None
    return crashed or ({first: failures[first]} if first in failures else {}) or \
        {r: f for r, f in failures.items() if f.exitcode != stopped} or failures
