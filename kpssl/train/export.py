"""Small copies of trained networks, for a book that shows trained networks without training them.

:func:`compact_copy` rewrites a fine-tuned ``best.pt`` or a pretraining ``encoder.pt`` with its
floating-point weights stored in half precision (float16) and, for an encoder, without its decoder
(which fine-tuning starts afresh and never reads). The copy keeps the format of its source, so the usual
loaders read it unchanged (:func:`kpssl.train.evaluate.load_finetuned`, :func:`kpssl.train.finetune.load_encoder`),
and ``load_state_dict`` casts the weights back to float32. Rounding to float16 changes each weight by at
most ``2**-11`` of its magnitude (values below float16's normal range, ``6.1e-5``, by at most ``2**-25``
absolutely); a tensor that float16 cannot hold (any ``|x| > 65504``) is kept in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import load_checkpoint, save_checkpoint

__all__ = ["compact_copy", "HALF_MAX"]

HALF_MAX = float(torch.finfo(torch.float16).max)


def compact_copy(source: str | Path, out: str | Path, *, note: str = "") -> dict:
    """Write ``out``: ``source`` (a ``best.pt`` of fine-tuning or an ``encoder.pt`` of pretraining) in
    float16, an encoder without its decoder; atomically. Returns what was written (with the source path
    and ``note`` recorded under ``"compact"``). Raises ``ValueError`` naming ``source`` for other files."""
    source, out = Path(source), Path(out)
    state = load_checkpoint(source)
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in ("finetuned", "encoder") or not isinstance(state.get("model"), dict):
        raise ValueError(f"{source}: expected the best.pt of kpssl finetune or the encoder.pt of kpssl pretrain")
    if kind == "finetuned" and ("optimiser" in state or "step" in state):
        raise ValueError(f"{source}: a fine-tuning checkpoint.pt (with optimiser state); copy its best.pt")
    weights = {}
    for name, tensor in state["model"].items():
        if kind == "encoder" and name.startswith("decoder."):
            continue
        halve = tensor.is_floating_point() and (tensor.numel() == 0 or bool(tensor.abs().max() <= HALF_MAX))
        weights[name] = tensor.half() if halve else tensor  # integers (BatchNorm counters) stay as they are
    kept = {k: v for k, v in state.items() if k != "model"}
    written = {**kept, "model": weights, "compact": {"source": str(source), "dtype": "float16", "note": note}}
    save_checkpoint(out, written)
    return written
