"""Fine-tuning on M labelled patients, model selection, and evaluation on the held-out fold (the paper's experimental protocol).

Adam with weight decay, cosine learning rate from ``lr`` to ``lr_min``, cross-entropy (Dice + CE as an
option). The pretrained encoder, KAF layers included, is loaded; the decoder starts fresh. After each
epoch the model is scored on the **validation** patients carved from the training patients, and the
best epoch is kept; the test fold is touched once, at the end. The authors' protocol (selecting on the
test fold itself, a leak) exists only as ``selection="test_fold"``, labelled as such in the results.

    kpssl finetune --data DIR --method kaf --encoder runs/kaf/encoder.pt --fold 0 --labeled 2 --out RUN
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.preprocess import centre_offset
from ..data.slices import FoldCases, PreparedVolume, fold_cases
from ..data.splits import labelled_subset
from ..eval.metrics import PooledDice, summarise, volume_scores
from ..keypoints import KeypointCache, LabelledKeypointSlices, collate_labelled
from ..settings import Settings, save_settings
from .common import (
    EpochOrder, StepLog, cosine_lr, load_checkpoint, rng_state, runtime, save_checkpoint, seed_everything,
    set_rng_state, sync_batchnorm, unwrap,
)
from .methods import FINETUNE_METHODS, PRETRAINED, check_finetune_method
from .networks import segmentation_model
from .pretrain import to_device
from .run import RunError, RunIdentity, claim_run, weights_fingerprint, write_json

__all__ = ["FINETUNE_METHODS", "PRETRAINED", "FinetuneResult", "load_encoder", "segment", "predict_volume",
           "evaluate_volumes", "finetune"]


@dataclass
class FinetuneResult:
    out: Path
    validation: dict
    test: dict
    best_epoch: int
    seconds: float


def segment(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(B, C, P, P)`` of a segmentation network on a labelled batch: the KAF-UNet also takes the
    batch's keypoints and their validity mask, the UNet only the image."""
    if hasattr(unwrap(model), "kaf"):
        return model(batch["image"], batch["keypoints"], batch["valid"])
    return model(batch["image"])


def load_encoder(model: nn.Module, path: str | Path, method: str) -> list[str]:
    """Load a pretrained backbone's encoder (and KAF layers) into ``model``; the decoder stays fresh.

    Raises ``ValueError`` naming the file when it was pretrained by another method or its tensors do
    not fit this architecture. Returns the names of the loaded tensors.
    """
    state = load_checkpoint(path)
    if "model" not in state or "method" not in state:
        raise ValueError(f"{path}: not an encoder checkpoint written by kpssl pretrain")
    if state.get("kind", "encoder") != "encoder" or "epoch" in state or "step" in state:
        raise ValueError(f"{path}: not an encoder.pt of kpssl pretrain (a {state.get('kind', 'training')} "
                         "checkpoint); pass the encoder.pt of a pretraining run")
    if state["method"] != method:
        raise ValueError(f"{path}: pretrained with {state['method']!r}, cannot initialise {method!r}")
    own = model.state_dict()
    encoder = {k: v for k, v in state["model"].items() if not k.startswith("decoder.")}
    problems = [k for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if not k.startswith("decoder.") and k not in encoder]
    if problems or missing:
        detail = ", ".join((problems + missing)[:4])
        raise ValueError(f"{path}: does not fit this architecture ({len(problems)} mismatched, {len(missing)} "
                         f"missing tensors, e.g. {detail}); was it pretrained with other model settings?")
    model.load_state_dict(encoder, strict=False)
    return sorted(encoder)


@torch.no_grad()
def predict_volume(model: nn.Module, volume: PreparedVolume, dataset: LabelledKeypointSlices, first: int,
                   device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Class indices ``(Z, H, W)`` on the volume's full grid: each slice's centre patch is predicted and
    pasted back; outside the patch is background."""
    model.eval()
    z_count, h, w = volume.image.shape
    out = np.zeros((z_count, h, w), np.int64)
    for start in range(0, z_count, batch_size):
        items = [dataset[first + z] for z in range(start, min(z_count, start + batch_size))]
        batch = to_device(collate_labelled(items), device)
        labels = segment(model, batch).argmax(1).cpu().numpy()  # (b, P, P)
        dr, dc = centre_offset((h, w), labels.shape[-1])  # patch pixel (r + dr, c + dc) = volume pixel (r, c)
        r0, c0 = max(0, dr), max(0, dc)
        r1, c1 = min(labels.shape[-2], h + dr), min(labels.shape[-1], w + dc)
        out[start:start + len(items), r0 - dr:r1 - dr, c0 - dc:c1 - dc] = labels[:, r0:r1, c0:c1]
    return out


def evaluate_volumes(model: nn.Module, volumes: Sequence[PreparedVolume], settings: Settings, cache: KeypointCache,
                     device: torch.device, class_names: list[str], *, hd95: bool = True) -> dict:
    """3D Dice and HD95 per volume and pooled 2D Dice over all slices (:mod:`kpssl.eval.metrics`).

    ``hd95=False`` leaves out the surface distances (model selection needs only Dice)."""
    dataset = LabelledKeypointSlices(list(volumes), settings, cache, augment=False)
    pooled = PooledDice(settings.data.classes)
    scores = []
    first = 0
    for volume in volumes:
        prediction = predict_volume(model, volume, dataset, first, device)
        first += volume.slices
        scores.append(volume_scores(prediction, volume.label, settings.data.classes, volume.spacing, volume.case_id,
                                    hd95=hd95))
        for z in range(volume.slices):
            pooled.update(prediction[z], volume.label[z])
    return summarise(scores, pooled, class_names)


def _loss(logits: torch.Tensor, label: torch.Tensor, kind: str) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), label)
    if kind == "ce":
        return ce
    probabilities = logits.float().softmax(1)
    one_hot = F.one_hot(label, logits.shape[1]).movedim(-1, 1).float()
    dims = (0, 2, 3)
    dice = (2 * (probabilities * one_hot).sum(dims) + 1e-5) / (probabilities.sum(dims) + one_hot.sum(dims) + 1e-5)
    return ce + (1 - dice[1:].mean())


@dataclass
class _Progress:
    """Where a fine-tuning run stands; saved in ``checkpoint.pt`` and restored on resume."""

    epoch: int = 0
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    initial_score: float = float("nan")
    seconds_before: float = 0.0  # training time of earlier starts of this run


def _network(method: str, settings: Settings, encoder: str | Path | None, rt) -> tuple[nn.Module, nn.Module]:
    """The segmentation network (with the pretrained encoder loaded) and the module that trains it
    (the same, or its DistributedDataParallel wrapper)."""
    network = segmentation_model(method, settings.model)
    if encoder is not None:
        load_encoder(network, encoder, method)
    network = network.to(rt.device)
    model: nn.Module = network
    if rt.distributed:
        if rt.device.type == "cuda":
            network = sync_batchnorm(network)
        model = DistributedDataParallel(network, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return network, model


def _start(out: Path, resume: bool, rt, network: nn.Module, optimiser, scaler, log: StepLog) -> _Progress:
    """Restore the run from ``checkpoint.pt`` (``resume``) or start it afresh."""
    checkpoint_path = out / "checkpoint.pt"
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, rt.device)
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        progress = _Progress(state["epoch"], state["step"], state["best_score"], state["best_epoch"],
                             state["initial_score"], float(state.get("seconds", 0.0)))
        if rt.main:
            log.truncate_after(progress.step)
        return progress
    if rt.main:
        if checkpoint_path.is_file():
            raise ValueError(f"{out}: holds a previous run; pass resume=True (--resume) or choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        log.path.unlink(missing_ok=True)
    return _Progress()


def _train_epoch(model: nn.Module, dataset: LabelledKeypointSlices, order: EpochOrder, optimiser, scaler,
                 progress: _Progress, settings: Settings, total_steps: int, rt) -> tuple[list[float], float]:
    """One epoch of steps; returns the step losses and the last learning rate."""
    ft = settings.finetune
    model.train()
    dataset.set_epoch(progress.epoch)
    loader = DataLoader(dataset, batch_sampler=list(order.batches(progress.epoch)), num_workers=ft.workers,
                        collate_fn=collate_labelled, pin_memory=rt.device.type == "cuda")
    losses, lr = [], ft.lr
    for item in loader:
        item = to_device(item, rt.device)
        lr = cosine_lr(progress.step, total_steps, ft.lr, ft.lr_min)
        for group in optimiser.param_groups:
            group["lr"] = lr
        with rt.autocast():
            logits = segment(model, item)
        loss = _loss(logits, item["label"], ft.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning step {progress.step}: loss is {loss.item()}")
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        losses.append(loss.item())
        progress.step += 1
    return losses, lr


def _save_epoch(out: Path, method: str, network: nn.Module, optimiser, scaler, progress: _Progress, score: float,
                losses: list[float], lr: float, settings: Settings, log: StepLog, seconds: float) -> None:
    """After an epoch: keep the best weights (``best.pt``), log the epoch, write ``checkpoint.pt``."""
    if score > progress.best_score:
        progress.best_score, progress.best_epoch = score, progress.epoch
        save_checkpoint(out / "best.pt", {"kind": "finetuned", "method": method, "model": network.state_dict(),
                                          "epoch": progress.epoch, "settings": settings.to_dict()})
    log.write({"epoch": progress.epoch, "step": progress.step, "lr": lr, "loss": float(np.mean(losses)),
               "selection_dice": score, "seconds": round(seconds, 3)})
    save_checkpoint(out / "checkpoint.pt", {
        "kind": "finetuned", "method": method, "epoch": progress.epoch, "step": progress.step,
        "model": network.state_dict(), "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(),
        "rng": rng_state(), "best_score": progress.best_score, "best_epoch": progress.best_epoch,
        "initial_score": progress.initial_score, "settings": settings.to_dict(), "seconds": seconds})


def finetune(
    settings: Settings,
    data: str | Path,
    method: str,
    fold: int,
    labelled: int,
    out: str | Path,
    *,
    encoder: str | Path | None = None,
    resume: bool = False,
    max_epochs: int | None = None,
    progress: bool = True,
    device: str | None = None,
    allow_change: tuple[str, ...] = (),
    command: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``method`` on ``labelled`` patients of fold ``fold`` and evaluate on the test fold.

    ``encoder`` is the ``encoder.pt`` of a pretraining run (required for pretrained methods, refused for
    ``unet_random``/``kaf_random``). Writes ``settings.yaml``, ``log.csv``, ``checkpoint.pt`` (latest),
    ``best.pt`` (selected weights) and ``result.json`` to ``out``, and ``run.json``, which records what
    the run is (method, fold, M, data, encoder, settings; :mod:`kpssl.train.run`): resuming a folder that
    holds another run is refused before any work, except for the changes named in ``allow_change``.
    """
    check_finetune_method(method, encoder)
    ft, out = settings.finetune, Path(out)
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    rt = runtime(ft.mixed_precision, device)
    seed_everything(settings.seed)
    fold_data, train_patients, identity = _claim(settings, data, method, fold, labelled, out, encoder, resume,
                                                 allow_change, command, rt.main)
    split, class_names = fold_data.split, fold_data.class_names(settings.data.classes)
    train_volumes = fold_data.volumes(train_patients, settings.data)
    selection_volumes = fold_data.volumes(split.validation if ft.selection == "validation" else split.test,
                                          settings.data)
    cache = KeypointCache(Path(data))
    dataset = LabelledKeypointSlices(train_volumes, settings, cache, augment=True)
    order = EpochOrder(len(dataset), min(ft.batch_size, len(dataset)), settings.seed, rt.rank, rt.world,
                       drop_last=False)
    network, model = _network(method, settings, encoder, rt)
    optimiser = torch.optim.Adam(network.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    scaler = rt.grad_scaler()
    log = StepLog(out / "log.csv", ["epoch", "step", "lr", "loss", "selection_dice", "seconds"])
    epochs = ft.epochs if max_epochs is None else min(ft.epochs, max_epochs)
    state = _start(out, resume, rt, network, optimiser, scaler, log)
    if rt.main:
        save_settings(settings, out / "settings.yaml")

    def select(net: nn.Module) -> float:
        return evaluate_volumes(net, selection_volumes, settings, cache, rt.device, class_names, hd95=False)["dice_3d"]

    started = time.perf_counter()
    if state.epoch == 0:  # the initialisation's score, so a run shows what fine-tuning gained
        state.initial_score = select(network)
        if rt.main:
            log.write({"epoch": 0, "step": 0, "lr": ft.lr, "selection_dice": state.initial_score, "seconds": 0.0})
    bar = tqdm(total=epochs, initial=state.epoch, desc=f"finetune {method} M={labelled} fold {fold}",
               disable=not (progress and rt.main), dynamic_ncols=True)
    while state.epoch < epochs:
        losses, lr = _train_epoch(model, dataset, order, optimiser, scaler, state, settings,
                                  ft.epochs * order.steps_per_epoch, rt)
        state.epoch += 1
        score = select(network)
        if rt.main:
            _save_epoch(out, method, network, optimiser, scaler, state, score, losses, lr, settings, log,
                        state.seconds_before + time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", dice=f"{score:.3f}", best=f"{state.best_score:.3f}")
    bar.close()

    network.load_state_dict(load_checkpoint(out / "best.pt", rt.device)["model"])
    test = evaluate_volumes(network, fold_data.volumes(split.test, settings.data), settings, cache, rt.device,
                            class_names)
    seconds = state.seconds_before + time.perf_counter() - started
    if rt.main:
        write_json(out / "result.json", _record(identity, settings, state, fold_data, train_patients, encoder, out,
                                                seconds, test))
    return FinetuneResult(out, {"dice_3d": state.best_score, "initial_dice_3d": state.initial_score}, test,
                          state.best_epoch, seconds)


def _record(identity: RunIdentity, settings: Settings, state: _Progress, fold_data: FoldCases,
            train_patients: Sequence[str], encoder: str | Path | None, out: Path, seconds: float, test: dict) -> dict:
    """What ``result.json`` holds: the run, its patients, its selection, its test scores and settings."""
    split = fold_data.split
    return {
        "method": identity.method, "fold": identity.fold, "labeled": identity.labeled, "seed": settings.seed,
        "preset": settings.name, "selection": settings.finetune.selection, "best_epoch": state.best_epoch,
        "selection_dice_3d": state.best_score, "initial_selection_dice_3d": state.initial_score,
        "train_patients": list(train_patients), "validation_patients": list(split.validation),
        "test_patients": list(split.test), "encoder": None if encoder is None else str(encoder),
        "checkpoint": str(out / "best.pt"), "seconds": seconds, "test": test, "settings": settings.to_dict(),
        "settings_hash": identity.settings_hash, "data": identity.data, "encoder_weights": identity.encoder,
    }


def _claim(settings: Settings, data: str | Path, method: str, fold: int, labelled: int, out: Path,
           encoder: str | Path | None, resume: bool, allow_change: tuple[str, ...], command: str | None,
           main: bool) -> tuple[FoldCases, Sequence[str], RunIdentity]:
    """Check the fold, the budget and the encoder, then claim ``out`` for this run (:func:`claim_run`):
    everything that can refuse the run, before any volume is read."""
    fold_data = fold_cases(data, settings.data, settings.splits, fold)
    train_patients = labelled_subset(fold_data.split, labelled, settings.splits.subset_seed)
    if settings.finetune.selection == "validation" and not fold_data.split.validation:
        raise ValueError("selection='validation' needs validation patients, but splits.validation_fraction is 0; "
                         "raise it, or choose selection='test_fold' (the authors' protocol) knowingly")
    if encoder is not None and not Path(encoder).is_file():
        raise RunError(f"{encoder}: encoder not found (the encoder.pt of a kpssl pretrain run)")
    identity = RunIdentity.of("finetune", method, settings, fold_data.cases, Path(data), fold=fold, labeled=labelled,
                              encoder=None if encoder is None else weights_fingerprint(encoder))
    claim_run(out, identity, resume=resume, allow_change=allow_change, command=command, settings=settings, write=main)
    return fold_data, train_patients, identity
