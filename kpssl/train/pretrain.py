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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.layouts import find_cases
from ..data.slices import load_volumes
from ..keypoints import KeypointCache, PairDataset, collate_pairs
from ..settings import Settings, save_settings
from .common import (
    EpochOrder, NonFiniteLossError, StepLog, check_finite, cosine_lr, load_checkpoint, reduce_mean,
    rng_state, runtime, save_checkpoint, seed_everything, set_rng_state, sync_batchnorm,
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
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    out = Path(out)
    p = settings.pretrain
    rt = runtime(p.mixed_precision, device)
    seed_everything(settings.seed)
    cases = [v.case for v in volumes] if volumes is not None else \
        find_cases(Path(data), settings.data.layout, require_labels=False)
    identity = RunIdentity.of("pretrain", method, settings, cases, Path(data))
    claim_run(out, identity, resume=resume, allow_change=allow_change, command=command, settings=settings,
              write=rt.main)
    if volumes is None:
        volumes = load_volumes(cases, settings.data, labels=False)
    cache = KeypointCache(Path(data))
    dataset = PairDataset(volumes, settings, cache, seed=settings.seed, views=VIEWS[method])
    order = EpochOrder(len(dataset), p.batch_size, settings.seed, rt.rank, rt.world)
    total_steps = p.epochs * order.steps_per_epoch

    if log_every_steps is not None and log_every_steps < 1:
        raise ValueError(f"log_every_steps must be at least 1, got {log_every_steps}")
    flush_every = log_every_steps or (50 if rt.device.type == "cuda" else 1)
    network = rt.prepare(PretrainNetwork(method, settings.model, p))  # channels_last on CUDA
    if method == "kaf":
        network.matching_loss.check_matches = False  # collate_pairs checked every batch's matches
    if rt.distributed:
        if rt.device.type == "cuda":
            network = sync_batchnorm(network)
        model: torch.nn.Module = DistributedDataParallel(network, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    else:
        model = network
    optimiser = torch.optim.SGD(network.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    scaler = rt.grad_scaler()
    log = StepLog(out / "log.csv", LOG_COLUMNS)
    checkpoint_path = out / "checkpoint.pt"
    step, seconds_before = 0, 0.0
    terms: dict[str, float] = {}
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, rt.device)
        if state.get("method") != method:
            raise ValueError(f"{checkpoint_path}: holds a {state.get('method')!r} run, not {method!r}")
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
        last = log.truncate_after(step) if rt.main else None
        if last is not None:  # a finished run resumed again still reports its last terms
            terms = {k: float(v) for k, v in last.items() if k not in ("epoch", "step", "lr", "seconds") and v}
    elif rt.main:
        if checkpoint_path.is_file() and not resume:
            raise ValueError(f"{out}: holds a previous run; pass resume=True (--resume) or choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        log.path.unlink(missing_ok=True)
    if rt.main:
        save_settings(settings, out / "settings.yaml")

    def checkpoint(seconds: float | None = None) -> None:
        if rt.main:
            save_checkpoint(checkpoint_path, {
                "method": method, "step": step, "model": network.state_dict(),
                "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "settings": settings.to_dict(), "seconds": elapsed() if seconds is None else seconds,
            })

    last_step = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=last_step, initial=step, desc=f"pretrain {method}", disable=not (progress and rt.main),
               dynamic_ncols=True)
    started = time.perf_counter()

    def elapsed() -> float:
        """Training time of the run so far, over every start of it."""
        return seconds_before + time.perf_counter() - started

    pending: list[tuple[int, int, float, float, torch.Tensor]] = []  # (epoch, step index, lr, seconds, terms)
    names: list[str] = []
    checkpointed = step if resume and checkpoint_path.is_file() else None

    def nonfinite(epoch: int, index: int, row: dict[str, torch.Tensor]) -> None:
        """Record a non-finite step: its terms, its batch (rebuilt exactly) and where to replay it from."""
        dataset.set_epoch(epoch)
        samples = next(order.batches(epoch, index - epoch * order.steps_per_epoch))
        save_checkpoint(out / f"nonfinite_step{index}.pt", {
            "step": index, "epoch": epoch, "samples": samples, "terms": row,
            "batch": collate_pairs([dataset[i] for i in samples]),
            "last_checkpoint_step": checkpointed, "model": network.state_dict()})  # weights as found, later

    def flush() -> None:
        """Copy the pending steps' terms to the host at once, check them, write one log row per step."""
        nonlocal terms
        if not pending:
            return
        values = reduce_mean(torch.stack([t for *_, t in pending]), rt).float().cpu()  # (steps, terms)
        rows = list(pending)
        pending.clear()
        for (epoch, index, lr, seconds, _), row_values in zip(rows, values):
            row = dict(zip(names, row_values))
            try:
                check_finite(row, index)
            except NonFiniteLossError:
                if rt.main:
                    nonfinite(epoch, index, row)
                raise
            terms = {k: float(v) for k, v in row.items()}
            if rt.main:
                log.write({"epoch": epoch, "step": index + 1, "lr": lr, "seconds": round(seconds, 3), **terms})
            bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})

    def save() -> None:
        nonlocal checkpointed
        flush()  # a checkpoint never holds weights trained on a loss not yet checked
        checkpoint()
        checkpointed = step

    model.train()
    while step < last_step:
        epoch, start = divmod(step, order.steps_per_epoch)
        for batch in _loader(dataset, order, epoch, start, p.workers, rt.device.type == "cuda"):
            batch = to_device(batch, rt.device, rt.memory_format)
            lr = cosine_lr(step, total_steps, p.lr)
            for group in optimiser.param_groups:
                group["lr"] = lr
            with rt.autocast():
                loss, logged = model(batch)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            names = list(logged)
            pending.append((epoch, step, lr, elapsed(), torch.stack([logged[k] for k in names])))  # on the device
            step += 1
            if len(pending) >= flush_every:
                flush()
            if checkpoint_every_steps and step % checkpoint_every_steps == 0:
                save()
            if step >= last_step:
                break
        if step % order.steps_per_epoch == 0 and (step // order.steps_per_epoch) % p.checkpoint_every == 0:
            save()
    flush()
    bar.close()
    seconds = elapsed()
    checkpoint(seconds)
    if rt.main:
        save_checkpoint(out / "encoder.pt", {"kind": "encoder", "method": method, "model": network.encoder_state(),
                                             "settings": settings.to_dict()})
        result = {"method": method, "steps": step, "seconds": seconds, "last_terms": terms,
                  "device": str(rt.device), "world": rt.world, "settings_hash": identity.settings_hash,
                  "data": identity.data}
        write_json(out / "result.json", result)
    return PretrainResult(out, checkpoint_path, step, seconds, terms, network)
