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
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.preprocess import centre_offset
from ..data.slices import FoldCases, PreparedVolume, fold_cases
from ..data.splits import labelled_subset
from ..eval.metrics import PooledDice, summarise, volume_scores
from ..keypoints import KeypointCache, LabelledKeypointSlices, collate_labelled
from ..settings import Settings, save_settings
from .common import (
    EpochOrder, Runtime, StepLog, cosine_lr, distribute, load_checkpoint, rng_state, runtime, save_checkpoint,
    seed_everything, set_rng_state,
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
    """Logits ``(B, C, P, P)`` of a segmentation network on a labelled batch. Both networks take the image,
    the batch's keypoints and their validity mask; the UNet checks the keypoints and ignores them."""
    return model(batch["image"], batch["keypoints"], batch["valid"])


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
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    rt = runtime(settings.finetune.mixed_precision, device)
    seed_everything(settings.seed)
    run = _FinetuneRun(settings, Path(data), method, fold, labelled, Path(out), encoder, rt, resume, allow_change,
                       command)
    epochs = settings.finetune.epochs if max_epochs is None else min(settings.finetune.epochs, max_epochs)
    bar = tqdm(total=epochs, initial=run.state.epoch, desc=f"finetune {method} M={labelled} fold {fold}",
               disable=not (progress and rt.main), dynamic_ncols=True)
    run.started = time.perf_counter()
    run.train(epochs, bar)
    return run.finish()


class _FinetuneRun:
    """One fine-tuning run: its patients, data, network, optimiser and log, and the epochs that change them.

    Built in the order that fixes the random streams (the claim, the data, the network, then the resumed
    state), so a resumed run and an uninterrupted one take identical steps.
    """

    def __init__(self, settings: Settings, data: Path, method: str, fold: int, labelled: int, out: Path,
                 encoder: str | Path | None, rt: Runtime, resume: bool, allow_change: tuple[str, ...],
                 command: str | None):
        ft = settings.finetune
        self.settings, self.method, self.out, self.encoder, self.rt = settings, method, out, encoder, rt
        self.fold_data, self.train_patients, self.identity = _claim(settings, data, method, fold, labelled, out,
                                                                    encoder, resume, allow_change, command, rt.main)
        split = self.fold_data.split
        self.class_names = self.fold_data.class_names(settings.data.classes)
        train_volumes = self.fold_data.volumes(self.train_patients, settings.data)
        self.selection_volumes = self.fold_data.volumes(split.validation if ft.selection == "validation"
                                                        else split.test, settings.data)
        self.cache = KeypointCache(data)
        self.dataset = LabelledKeypointSlices(train_volumes, settings, self.cache, augment=True)
        self.order = EpochOrder(len(self.dataset), min(ft.batch_size, len(self.dataset)), settings.seed, rt.rank,
                                rt.world, drop_last=False)
        self.total_steps = ft.epochs * self.order.steps_per_epoch
        self.network = segmentation_model(method, settings.model)
        if encoder is not None:
            load_encoder(self.network, encoder, method)
        self.network = self.network.to(rt.device)
        self.model = distribute(self.network, rt)  # DistributedDataParallel under torchrun
        self.optimiser = torch.optim.Adam(self.network.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
        self.scaler = rt.grad_scaler()
        self.log = StepLog(out / "log.csv", ["epoch", "step", "lr", "loss", "selection_dice", "seconds"])
        self.state = self._start_or_resume(resume)
        self.started = time.perf_counter()
        if rt.main:
            save_settings(settings, out / "settings.yaml")

    def _start_or_resume(self, resume: bool) -> _Progress:
        """Restore the run from ``checkpoint.pt`` (``resume``) or start it afresh."""
        rt, path = self.rt, self.out / "checkpoint.pt"
        if resume and path.is_file():
            state = load_checkpoint(path, rt.device)
            self.network.load_state_dict(state["model"])
            self.optimiser.load_state_dict(state["optimiser"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            progress = _Progress(state["epoch"], state["step"], state["best_score"], state["best_epoch"],
                                 state["initial_score"], float(state.get("seconds", 0.0)))
            if rt.main:
                self.log.truncate_after(progress.step)
            return progress
        if rt.main:
            if path.is_file():
                raise ValueError(f"{self.out}: holds a previous run; pass resume=True (--resume) or choose another folder")
            self.out.mkdir(parents=True, exist_ok=True)
            self.log.path.unlink(missing_ok=True)
        return _Progress()

    def elapsed(self) -> float:
        """Training time of the run so far, over every start of it."""
        return self.state.seconds_before + time.perf_counter() - self.started

    def select(self) -> float:
        """The model-selection score: 3D Dice on the validation patients (or the test fold, knowingly)."""
        return evaluate_volumes(self.network, self.selection_volumes, self.settings, self.cache, self.rt.device,
                                self.class_names, hd95=False)["dice_3d"]

    def train(self, epochs: int, bar: Any) -> None:
        """Score the initialisation (epoch 0), then train, select and checkpoint epoch by epoch up to ``epochs``."""
        state, rt = self.state, self.rt
        if state.epoch == 0:  # the initialisation's score, so a run shows what fine-tuning gained
            state.initial_score = self.select()
            if rt.main:
                self.log.write({"epoch": 0, "step": 0, "lr": self.settings.finetune.lr,
                                "selection_dice": state.initial_score, "seconds": 0.0})
        while state.epoch < epochs:
            losses, lr = self.train_epoch()
            state.epoch += 1
            score = self.select()
            if rt.main:
                self.save_epoch(score, losses, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", dice=f"{score:.3f}", best=f"{state.best_score:.3f}")
        bar.close()

    def train_epoch(self) -> tuple[list[float], float]:
        """One epoch of Adam steps; returns the step losses and the last learning rate."""
        ft, rt, state = self.settings.finetune, self.rt, self.state
        self.model.train()
        self.dataset.set_epoch(state.epoch)
        loader = DataLoader(self.dataset, batch_sampler=list(self.order.batches(state.epoch)), num_workers=ft.workers,
                            collate_fn=collate_labelled, pin_memory=rt.device.type == "cuda")
        losses, lr = [], ft.lr
        for item in loader:
            item = to_device(item, rt.device)
            lr = cosine_lr(state.step, self.total_steps, ft.lr, ft.lr_min)
            for group in self.optimiser.param_groups:
                group["lr"] = lr
            with rt.autocast():
                logits = segment(self.model, item)
            loss = _loss(logits, item["label"], ft.loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning step {state.step}: loss is {loss.item()}")
            self.optimiser.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
            losses.append(loss.item())
            state.step += 1
        return losses, lr

    def save_epoch(self, score: float, losses: list[float], lr: float) -> None:
        """After an epoch: keep the best weights (``best.pt``), log the epoch, write ``checkpoint.pt``."""
        state, network, settings = self.state, self.network, self.settings
        seconds = self.elapsed()
        if score > state.best_score:
            state.best_score, state.best_epoch = score, state.epoch
            save_checkpoint(self.out / "best.pt", {"kind": "finetuned", "method": self.method,
                                                   "model": network.state_dict(), "epoch": state.epoch,
                                                   "settings": settings.to_dict()})
        self.log.write({"epoch": state.epoch, "step": state.step, "lr": lr, "loss": float(np.mean(losses)),
                        "selection_dice": score, "seconds": round(seconds, 3)})
        save_checkpoint(self.out / "checkpoint.pt", {
            "kind": "finetuned", "method": self.method, "epoch": state.epoch, "step": state.step,
            "model": network.state_dict(), "optimiser": self.optimiser.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "best_score": state.best_score,
            "best_epoch": state.best_epoch, "initial_score": state.initial_score, "settings": settings.to_dict(),
            "seconds": seconds})

    def finish(self) -> FinetuneResult:
        """Evaluate the selected weights (``best.pt``) once on the test fold; write ``result.json``."""
        rt, state, settings = self.rt, self.state, self.settings
        self.network.load_state_dict(load_checkpoint(self.out / "best.pt", rt.device)["model"])
        test = evaluate_volumes(self.network, self.fold_data.volumes(self.fold_data.split.test, settings.data),
                                settings, self.cache, rt.device, self.class_names)
        seconds = self.elapsed()
        if rt.main:
            write_json(self.out / "result.json", _record(self.identity, settings, state, self.fold_data,
                                                         self.train_patients, self.encoder, self.out, seconds, test))
        return FinetuneResult(self.out, {"dice_3d": state.best_score, "initial_dice_3d": state.initial_score}, test,
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
