"""Machinery shared by pretraining and fine-tuning: devices, precision, distribution, checkpoints, logs.

- ``Runtime``: device, precision (:func:`amp_dtype_for`: bf16 autocast on GPUs of compute capability
  8.0 or more, fp16 with a gradient scaler below, float32 on the CPU), memory format (channels_last on
  CUDA only), rank and world size from ``torchrun``'s environment.
- Checkpoints are written to a temporary file and renamed, so a killed run never leaves a half-written
  checkpoint; they are read with ``torch.load(weights_only=True)``. Random-generator states are always
  read back as CPU tensors, whatever device the rest of a checkpoint is loaded onto.
- ``EpochOrder``: the sample order of an epoch is a function of (seed, epoch) alone and is cut into
  equal shares per rank, so a resumed or distributed run sees the same samples as an uninterrupted one.
- ``StepLog``: one CSV row per optimisation step (loss terms, learning rate), appended and flushed.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_write

__all__ = [
    "Runtime",
    "runtime",
    "amp_dtype_for",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "EpochOrder",
    "StepLog",
    "cosine_lr",
    "NonFiniteLossError",
    "check_finite",
    "reduce_mean",
    "sync_batchnorm",
    "distribute",
]


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full float32
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    channels_last: bool = False  # NHWC image tensors and convolution weights (CUDA only)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Active only for fp16 (bf16 and float32 need no loss scaling)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, in channels_last where chosen (values are unchanged)."""
        return model.to(self.device, memory_format=self.memory_format)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-d image batch in this runtime's memory format; anything else is returned as it is."""
        return x.contiguous(memory_format=self.memory_format) if self.channels_last and x.ndim == 4 else x


def amp_dtype_for(device: torch.device, mixed_precision: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device``: ``None`` (float32) on the CPU or without mixed precision.

    On CUDA: bfloat16 from compute capability 8.0 on (Ampere and later have bf16 tensor cores); float16
    (with the gradient scaler, :meth:`Runtime.grad_scaler`) below, e.g. on a T4 (7.5), where
    ``torch.cuda.is_bf16_supported()`` may report True through slow emulation.
    """
    if not mixed_precision or device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def runtime(mixed_precision: bool = True, device: str | None = None, channels_last: bool = True) -> Runtime:
    """Device and precision for this process; joins the process group when started by ``torchrun``.

    ``channels_last`` takes effect on CUDA only (on the CPU the contiguous layout is kept).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank if world > 1 else (torch_device.index or 0))
        torch.cuda.set_device(torch_device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    amp_dtype = amp_dtype_for(torch_device, mixed_precision)
    return Runtime(torch_device, amp_dtype, rank, world, local_rank,
                   channels_last=channels_last and torch_device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through dicts, lists, tuples) moved to ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def _cpu(value: Any) -> Any:
    return _moved(value, torch.device("cpu"))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved. The generator states (byte tensors) are taken to the CPU
    first: a checkpoint loaded with ``map_location="cuda"`` brings them onto the GPU, which
    ``torch.set_rng_state`` refuses."""
    state = _cpu(state)
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` to a temporary file in the same folder, then rename
    (:func:`kpssl.atomic.atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); errors name the file.

    Tensors go to ``map_location`` (a device or its name), except the random-generator states under
    ``"rng"``, which stay on the CPU, where :func:`set_rng_state` needs them: the file is read onto the
    CPU and everything else is then moved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    device = torch.device(map_location)
    if device.type == "cpu":
        return state
    if isinstance(state, dict):
        return {k: v if k == "rng" else _moved(v, device) for k, v in state.items()}
    return _moved(state, device)


class EpochOrder:
    """Sample order of each epoch: a permutation drawn from (seed, epoch), cut into per-rank shares.

    ``drop_last=True`` (pretraining): the permutation is truncated to a multiple of the global batch, so
    all ranks take the same number of equal steps (dropped samples change every epoch).
    ``drop_last=False`` (fine-tuning): the last, partial batch is kept, so every sample is seen in every
    epoch; with several processes it is padded with the permutation's first samples to a multiple of
    the number of processes, so every rank still takes the same number of steps.
    ``batches(epoch, start_step)`` skips the steps a resumed run has already done.
    """

    def __init__(self, samples: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True):
        if global_batch % world:
            raise ValueError(f"the global batch {global_batch} must be divisible by the number of processes {world}")
        if drop_last and samples < global_batch:
            raise ValueError(f"{samples} samples are fewer than one batch of {global_batch}")
        if samples < 1:
            raise ValueError("no samples to train on")
        self.samples, self.global_batch, self.seed, self.rank, self.world = samples, global_batch, seed, rank, world
        self.local_batch = global_batch // world
        self.drop_last = drop_last

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.samples // self.global_batch
        return -(-self.samples // self.global_batch)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.samples)
        for step in range(start_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            if len(chunk) < self.global_batch:  # the last, partial batch (drop_last=False)
                short = -len(chunk) % self.world
                chunk = np.concatenate([chunk, order[:short]])  # pad to a multiple of the processes
                share = len(chunk) // self.world
                yield chunk[self.rank * share:(self.rank + 1) * share].tolist()
                continue
            yield chunk[self.rank * self.local_batch:(self.rank + 1) * self.local_batch].tolist()


class StepLog:
    """Append one CSV row per step; the header is written when the file is new."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns

    def truncate_after(self, step: int) -> dict[str, str] | None:
        """Drop rows past ``step`` (a resumed run rewrites them); return the last row kept, if any."""
        if not self.path.is_file():
            return None
        with self.path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)
        return rows[-1] if rows else None

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def cosine_lr(step: int, total: int, lr: float, lr_min: float = 0.0) -> float:
    """Cosine decay from ``lr`` at step 0 to ``lr_min`` at step ``total``."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(f"step {step}: loss term '{name}' is {value.item()}")


def reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean of a scalar over all processes (for logging)."""
    if not runtime.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / runtime.world


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace plain ``BatchNorm1d``/``BatchNorm2d`` layers by ``SyncBatchNorm`` (CUDA, several processes).

    Only those exact types: subclasses such as the KAF layers' masked BatchNorm over keypoints take a mask
    argument that ``SyncBatchNorm`` does not, and keep their per-process statistics.
    """
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            sync_batchnorm(child)
    return module


def distribute(network: nn.Module, runtime: Runtime) -> nn.Module:
    """The module a training step calls: ``network`` itself in a single process; under ``torchrun`` its
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper, after its plain BatchNorm layers became
    ``SyncBatchNorm`` on CUDA (:func:`sync_batchnorm`, in place, so ``network`` keeps being the network
    whose weights are saved and loaded). ``network`` must already be on ``runtime.device``.

    Pretraining and fine-tuning both wrap their networks here.
    """
    if not runtime.distributed:
        return network
    cuda = runtime.device.type == "cuda"
    if cuda:
        sync_batchnorm(network)
    return DistributedDataParallel(network, device_ids=[runtime.device.index] if cuda else None)

