"""Evaluate a fine-tuned checkpoint on the patients of a fold (``kpssl evaluate``).

:func:`load_finetuned` is the one way to turn a ``best.pt`` back into a network: it reads the weights,
the method and the settings stored beside them, and refuses anything else (a pretraining ``encoder.pt``
or ``checkpoint.pt``) with a message saying what the file is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.slices import fold_cases, load_volumes
from ..keypoints import KeypointCache
from ..settings import Settings
from .common import load_checkpoint
from .finetune import evaluate_volumes
from .methods import FINETUNE_METHODS
from .networks import segmentation_model
from .run import RunError

__all__ = ["load_finetuned", "evaluate_checkpoint"]


def _kind(state: dict) -> str:
    """``"finetuned"``, ``"encoder"`` (pretraining output) or ``"pretraining checkpoint"``."""
    if "kind" in state:
        return str(state["kind"])
    if "epoch" in state:  # best.pt and checkpoint.pt of fine-tuning, before checkpoints carried a kind
        return "finetuned"
    return "pretraining checkpoint" if "step" in state else "encoder"


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Settings, dict]:
    """The fine-tuned network in ``path`` (a ``best.pt``), its settings and the raw checkpoint.

    Raises :class:`~kpssl.train.run.RunError` naming the file when it is a pretraining output (an
    ``encoder.pt`` holds an encoder and an untrained decoder; its Dice would mean nothing), lacks the
    method or settings, or its weights do not fit the model its settings describe."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: a folder; expected a fine-tuned checkpoint file (best.pt of kpssl finetune)")
    state = load_checkpoint(path)
    kind = _kind(state) if isinstance(state, dict) else "unknown"
    if kind != "finetuned":
        what = {"encoder": "an encoder (encoder.pt)",
                "pretraining checkpoint": "a pretraining checkpoint"}.get(kind, f"a {kind} checkpoint")
        raise RunError(f"{path}: {what} written by kpssl pretrain, not a fine-tuned network; evaluation needs "
                       "the best.pt of a kpssl finetune run")
    if not {"method", "model", "settings"} <= set(state) or state["method"] not in FINETUNE_METHODS:
        raise RunError(f"{path}: not a fine-tuned checkpoint written by kpssl finetune "
                       "(no method, weights or settings)")
    settings = Settings.from_dict(state["settings"])
    model = segmentation_model(state["method"], settings.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise RunError(f"{path}: weights do not fit the {state['method']} model of its settings ({error})") from None
    return model.to(device), settings, state


def evaluate_checkpoint(checkpoint: Path, data: Path, fold: int, *, split: str = "test",
                        device: str | None = None) -> dict:
    """Load ``best.pt`` (weights, method and settings inside) and score it on a fold's test or validation
    patients: 3D Dice, HD95 and pooled 2D Dice."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, settings, state = load_finetuned(checkpoint, torch_device)
    fold_data = fold_cases(data, settings.data, settings.splits, fold)
    patients = set(fold_data.split.test if split == "test" else fold_data.split.validation)
    volumes = load_volumes([c for c in fold_data.cases if c.patient in patients], settings.data)
    names = fold_data.class_names(settings.data.classes)
    summary = evaluate_volumes(model, volumes, settings, KeypointCache(data), torch_device, names)
    return {"method": state["method"], "fold": fold, "split": split, "checkpoint": str(checkpoint), **summary}
