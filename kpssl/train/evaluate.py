"""Evaluate a fine-tuned checkpoint on the patients of a fold (``kpssl evaluate``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.layouts import find_cases
from ..data.slices import load_volumes
from ..data.splits import fold_split
from ..keypoints import KeypointCache
from ..settings import Settings
from .common import load_checkpoint
from .finetune import evaluate_volumes
from .networks import segmentation_model

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: Path, data: Path, fold: int, *, split: str = "test",
                        device: str | None = None) -> dict:
    """Load ``best.pt`` (weights, method and settings inside) and score it on a fold's test or validation
    patients: 3D Dice, HD95 and pooled 2D Dice."""
    state = load_checkpoint(checkpoint)
    if not {"method", "model", "settings"} <= set(state):
        raise ValueError(f"{checkpoint}: not a fine-tuned checkpoint written by kpssl finetune")
    settings = Settings.from_dict(state["settings"])
    model = segmentation_model(state["method"], settings.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: weights do not fit the {state['method']} model of its settings ({error})") from None
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(torch_device)
    cases = find_cases(data, settings.data.layout)
    folds = fold_split(sorted({c.patient for c in cases}), fold, settings.splits)
    patients = set(folds.test if split == "test" else folds.validation)
    volumes = load_volumes([c for c in cases if c.patient in patients], settings.data)
    names = [cases[0].labels.get(c, str(c)) for c in range(1, settings.data.classes)]
    summary = evaluate_volumes(model, volumes, settings, KeypointCache(data), torch_device, names)
    return {"method": state["method"], "fold": fold, "split": split, "checkpoint": str(checkpoint), **summary}
