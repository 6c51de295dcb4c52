"""Self-supervised pretraining (the paper's Eqs. 1-3 and protocol): one loop for ``kaf``, ``pcl``, ``gcl``, ``simclr``.

SGD with momentum and a cosine schedule (per step); CUDA with mixed precision where present; several
processes through ``torchrun`` (DistributedDataParallel, gloo on the CPU, nccl on GPUs); a CSV log of
every step; atomic checkpoints holding everything needed to resume exactly; a non-finite loss stops the
run with a message naming the step and the term.

The step never waits for the GPU: the loss terms stay on the device and are written to the log (one
copy to the host for many steps) every ``log_every_steps`` steps, before every checkpoint and at the
end; the non-finite check runs on those rows. A non-finite loss is therefore found at the next flush:
the run stops there, before any checkpoint could hold weights trained on it, and writes
``nonfinite_step{N}.pt`` with the step, its terms, the exact batch (rebuilt from the data: every batch
is a function of the seed, the epoch and the sample indices) and the step of the last checkpoint,
from which the run replays to that step. Match indices are checked once per batch on the CPU where the
batch is made (:func:`kpssl.keypoints.collate_pairs`), not in the step.

    kpssl pretrain --data DIR --method kaf --preset tiny --out runs/kaf
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.layouts import find_cases
from ..data.slices import load_volumes
from ..keypoints import KeypointCache, PairDataset, collate_pairs
from ..settings import Settings, save_settings
from .common import (
    EpochOrder, NonFiniteLossError, Runtime, StepLog, check_finite, cosine_lr, distribute, load_checkpoint,
    reduce_mean, rng_state, runtime, save_checkpoint, seed_everything, set_rng_state,
)
from .networks import METHODS, VIEWS, PretrainNetwork
from .run import RunIdentity, claim_run, write_json

__all__ = ["PretrainResult", "pretrain", "to_device"]

LOG_COLUMNS = ["epoch", "step", "lr", "total", "contrastive", "pcl", "global", "local", "local_contrastive",
               "seconds"]


@dataclass
class PretrainResult:
    out: Path
    checkpoint: Path
    steps: int
    seconds: float
    last_terms: dict[str, float]
    network: PretrainNetwork  # the trained backbone and heads (this process's replica)


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              memory_format: torch.memory_format = torch.preserve_format) -> dict[str, torch.Tensor]:
    """Move a batch's tensors to ``device`` (asynchronously from pinned memory); 4-d images also take
    ``memory_format`` (``torch.channels_last`` on CUDA, see :class:`kpssl.train.common.Runtime`)."""
    return {k: (v.to(device, non_blocking=True, memory_format=memory_format) if v.ndim == 4
                else v.to(device, non_blocking=True)) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loader(dataset: Any, order: EpochOrder, epoch: int, start_step: int, workers: int, pin: bool) -> DataLoader:
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_sampler=list(order.batches(epoch, start_step)), num_workers=workers,
                      collate_fn=collate_pairs, pin_memory=pin, persistent_workers=False)


def pretrain(
    settings: Settings,
    data: str | Path,
    method: str,
    out: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    device: str | None = None,
    checkpoint_every_steps: int | None = None,
    log_every_steps: int | None = None,
    volumes: list | None = None,
    allow_change: tuple[str, ...] = (),
    command: str | None = None,
) -> PretrainResult:
    """Pretrain ``method`` on the (unlabelled) volumes under ``data``; write everything to ``out``.

    ``out`` receives ``settings.yaml``, ``log.csv`` (one row per step), ``checkpoint.pt`` (latest,
    everything needed to resume), ``encoder.pt`` (the backbone weights fine-tuning loads) and
    ``result.json``. ``max_steps`` stops early (tests, chapters); ``resume`` continues from
    ``checkpoint.pt`` exactly where it stopped. ``checkpoint_every_steps`` adds mid-epoch checkpoints.
    ``log_every_steps`` (default: every step on the CPU, every 50 on a GPU) sets how often the loss terms
    are copied to the host, written and checked (the module docstring); the log holds every step either way.
    ``out/run.json`` records what the run is (:mod:`kpssl.train.run`); resuming a folder that holds
    another run (other method, data or settings) is refused before any work, except for the changes
    named in ``allow_change`` (more epochs). ``command`` is recorded there.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; expected one of {', '.join(METHODS)}")
    for name, value in (("max_steps", max_steps), ("log_every_steps", log_every_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    rt = runtime(settings.pretrain.mixed_precision, device)
    seed_everything(settings.seed)
    run = _PretrainRun(settings, Path(data), method, Path(out), rt, volumes, resume, allow_change, command,
                       log_every_steps)
    last_step = run.total_steps if max_steps is None else min(run.total_steps, max_steps)
    run.bar = tqdm(total=last_step, initial=run.step, desc=f"pretrain {method}",
                   disable=not (progress and rt.main), dynamic_ncols=True)
    run.started = time.perf_counter()
    run.train(last_step, checkpoint_every_steps)
    return run.finish()


class _PretrainRun:
    """One pretraining run: its data, network, optimiser and log, and the steps that change them.

    Built in the order that fixes the random streams (data, then network), so a resumed run and an
    uninterrupted one take identical steps.
    """

    def __init__(self, settings: Settings, data: Path, method: str, out: Path, rt: Runtime, volumes: list | None,
                 resume: bool, allow_change: tuple[str, ...], command: str | None, log_every_steps: int | None):
        self.settings, self.method, self.out, self.rt = settings, method, out, rt
        p = settings.pretrain
        cases = [v.case for v in volumes] if volumes is not None else \
            find_cases(data, settings.data.layout, require_labels=False)
        self.identity = RunIdentity.of("pretrain", method, settings, cases, data)
        claim_run(out, self.identity, resume=resume, allow_change=allow_change, command=command,
                  settings=settings, write=rt.main)
        if volumes is None:
            volumes = load_volumes(cases, settings.data, labels=False)
        self.dataset = PairDataset(volumes, settings, KeypointCache(data), seed=settings.seed, views=VIEWS[method])
        self.order = EpochOrder(len(self.dataset), p.batch_size, settings.seed, rt.rank, rt.world)
        self.total_steps = p.epochs * self.order.steps_per_epoch
        self.flush_every = log_every_steps or (50 if rt.device.type == "cuda" else 1)
        self.network = rt.prepare(PretrainNetwork(method, settings.model, p))  # channels_last on CUDA
        if method == "kaf":
            self.network.matching_loss.check_matches = False  # collate_pairs checked every batch's matches
        self.model = distribute(self.network, rt)  # DistributedDataParallel under torchrun
        self.optimiser = torch.optim.SGD(self.network.parameters(), lr=p.lr, momentum=p.momentum,
                                         weight_decay=p.weight_decay)
        self.scaler = rt.grad_scaler()
        self.log = StepLog(out / "log.csv", LOG_COLUMNS)
        self.checkpoint_path = out / "checkpoint.pt"
        self.step, self.seconds_before, self.terms = 0, 0.0, {}
        self.pending: list[tuple[int, int, float, float, torch.Tensor]] = []  # (epoch, step, lr, seconds, terms)
        self.names: list[str] = []
        self.bar: Any = None
        self.started = time.perf_counter()
        self.checkpointed = self._start_or_resume(resume)
        if rt.main:
            save_settings(settings, out / "settings.yaml")

    def _start_or_resume(self, resume: bool) -> int | None:
        """Load ``checkpoint.pt`` when resuming, else start a fresh folder; the step last checkpointed."""
        rt, path = self.rt, self.checkpoint_path
        if resume and path.is_file():
            state = load_checkpoint(path, rt.device)
            if state.get("method") != self.method:
                raise ValueError(f"{path}: holds a {state.get('method')!r} run, not {self.method!r}")
            self.network.load_state_dict(state["model"])
            self.optimiser.load_state_dict(state["optimiser"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.step, self.seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
            last = self.log.truncate_after(self.step) if rt.main else None
            if last is not None:  # a finished run resumed again still reports its last terms
                self.terms = {k: float(v) for k, v in last.items()
                              if k not in ("epoch", "step", "lr", "seconds") and v}
            return self.step
        if rt.main:
            if path.is_file():
                raise ValueError(f"{self.out}: holds a previous run; pass resume=True (--resume) or choose another folder")
            self.out.mkdir(parents=True, exist_ok=True)
            self.log.path.unlink(missing_ok=True)
        return None

    def elapsed(self) -> float:
        """Training time of the run so far, over every start of it."""
        return self.seconds_before + time.perf_counter() - self.started

    def checkpoint(self, seconds: float | None = None) -> None:
        if self.rt.main:
            save_checkpoint(self.checkpoint_path, {
                "method": self.method, "step": self.step, "model": self.network.state_dict(),
                "optimiser": self.optimiser.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "settings": self.settings.to_dict(), "seconds": self.elapsed() if seconds is None else seconds,
            })

    def save(self) -> None:
        self.flush()  # a checkpoint never holds weights trained on a loss not yet checked
        self.checkpoint()
        self.checkpointed = self.step

    def nonfinite(self, epoch: int, index: int, row: dict[str, torch.Tensor]) -> None:
        """Record a non-finite step: its terms, its batch (rebuilt exactly) and where to replay it from."""
        self.dataset.set_epoch(epoch)
        samples = next(self.order.batches(epoch, index - epoch * self.order.steps_per_epoch))
        save_checkpoint(self.out / f"nonfinite_step{index}.pt", {
            "step": index, "epoch": epoch, "samples": samples, "terms": row,
            "batch": collate_pairs([self.dataset[i] for i in samples]),
            "last_checkpoint_step": self.checkpointed, "model": self.network.state_dict()})  # weights as found

    def flush(self) -> None:
        """Copy the pending steps' terms to the host at once, check them, write one log row per step."""
        if not self.pending:
            return
        values = reduce_mean(torch.stack([t for *_, t in self.pending]), self.rt).float().cpu()  # (steps, terms)
        rows = list(self.pending)
        self.pending.clear()
        for (epoch, index, lr, seconds, _), row_values in zip(rows, values):
            row = dict(zip(self.names, row_values))
            try:
                check_finite(row, index)
            except NonFiniteLossError:
                if self.rt.main:
                    self.nonfinite(epoch, index, row)
                raise
            self.terms = {k: float(v) for k, v in row.items()}
            if self.rt.main:
                self.log.write({"epoch": epoch, "step": index + 1, "lr": lr, "seconds": round(seconds, 3),
                                **self.terms})
            self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.terms.items()})

    def optimise(self, batch: dict[str, torch.Tensor], epoch: int) -> None:
        """One SGD step on a batch; its loss terms stay on the device until the next flush."""
        rt = self.rt
        batch = to_device(batch, rt.device, rt.memory_format)
        lr = cosine_lr(self.step, self.total_steps, self.settings.pretrain.lr)
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        with rt.autocast():
            loss, logged = self.model(batch)
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.names = list(logged)
        self.pending.append((epoch, self.step, lr, self.elapsed(), torch.stack([logged[k] for k in self.names])))
        self.step += 1
        if len(self.pending) >= self.flush_every:
            self.flush()

    def train(self, last_step: int, checkpoint_every_steps: int | None) -> None:
        """Steps up to ``last_step``, checkpointing at epoch ends (and every ``checkpoint_every_steps``)."""
        p, order = self.settings.pretrain, self.order
        self.model.train()
        while self.step < last_step:
            epoch, start = divmod(self.step, order.steps_per_epoch)
            for batch in _loader(self.dataset, order, epoch, start, p.workers, self.rt.device.type == "cuda"):
                self.optimise(batch, epoch)
                if checkpoint_every_steps and self.step % checkpoint_every_steps == 0:
                    self.save()
                if self.step >= last_step:
                    break
            if self.step % order.steps_per_epoch == 0 and (self.step // order.steps_per_epoch) % p.checkpoint_every == 0:
                self.save()
        self.flush()
        self.bar.close()

    def finish(self) -> PretrainResult:
        """The last checkpoint, ``encoder.pt`` and ``result.json``."""
        seconds = self.elapsed()
        self.checkpoint(seconds)
        if self.rt.main:
            save_checkpoint(self.out / "encoder.pt", {"kind": "encoder", "method": self.method,
                                                      "model": self.network.encoder_state(),
                                                      "settings": self.settings.to_dict()})
            write_json(self.out / "result.json", {
                "method": self.method, "steps": self.step, "seconds": seconds, "last_terms": self.terms,
                "device": str(self.rt.device), "world": self.rt.world,
                "settings_hash": self.identity.settings_hash, "data": self.identity.data})
        return PretrainResult(self.out, self.checkpoint_path, self.step, seconds, self.terms, self.network)
