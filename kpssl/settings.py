"""Settings: one dataclass per concern, named presets, YAML/JSON round trips.

Every run records the :class:`Settings` it used (``save_settings``), so a result can always be traced to
the numbers that produced it. Nothing in the library reads global state: functions take the part of the
settings they need.

Presets
-------
``tiny``        CPU, minutes: small patch and widths, the built-in synthetic data.
``colab``       one GPU, about an hour: ACDC-like resolution, moderate widths.
``paper_acdc``  the paper's ACDC settings (Yang et al., 2023, method and experiments): f = 48, 352 x 352, T = 16, d = 256.
``paper_chd``   the paper's CHD settings: f = 32, 512 x 512, 8 classes, 1-99 percentile clipping.
                Both select the epoch on a validation share of the training patients, so their largest
                M is the rest of the fold (64 for ACDC, 43 for CHD) instead of the paper's 80 and 51.
``paper_acdc_authors``, ``paper_chd_authors``  the same with the authors' protocol: no validation
                share, the epoch chosen on the test fold (optimistic), M up to 80 and 51 as in the paper.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text

__all__ = [
    "DataSettings",
    "KeypointSettings",
    "AugmentSettings",
    "ModelSettings",
    "PretrainSettings",
    "FinetuneSettings",
    "SplitSettings",
    "Settings",
    "PRESETS",
    "preset",
    "save_settings",
    "load_settings",
    "SettingsError",
    "validate_settings",
]


@dataclass
class DataSettings:
    """How volumes become network inputs (the paper's experimental protocol)."""

    layout: str = "auto"  # "auto" (detected from the folder), "acdc" or "decathlon"
    spacing_mm: tuple[float, float] | None = (1.25, 1.25)  # in-plane target; None keeps the native grid
    clip_percentiles: tuple[float, float] | None = None  # e.g. (1, 99) for CT
    patch: int = 352  # square patch side in pixels after resampling
    classes: int = 4  # including background
    neighbour_rule: str = "adjacent"  # "adjacent" (+-1 slice, ACDC) or "fraction" (CHD)
    neighbour_fraction: float = 0.05  # CHD: offset int(fraction * U(-1, 1) * slices), redrawn if 0
    partitions: int = 4  # GCL partitions per volume


@dataclass
class KeypointSettings:
    """SIFT detection and the correspondence criterion (the paper's keypoints and correspondences)."""

    max_keypoints: int = 200  # K strongest by SIFT response; fewer are padded and masked
    radius_forward: float = 20.0  # Manhattan pixels, forward nearest-neighbour check
    radius_reverse: float = 30.0  # Manhattan pixels, weighting and reverse check


@dataclass
class AugmentSettings:
    """Joint geometric augmentation of image, mask and keypoints (the paper's experimental protocol)."""

    flip: bool = True  # mirror on both axes, each with p = 0.5
    p_deform: float = 0.67  # probability of elastic + rotation + scale
    elastic_alpha: tuple[float, float] = (100.0, 350.0)
    elastic_sigma: tuple[float, float] = (14.0, 17.0)
    rotation: tuple[float, float] = (0.0, 6.283185307179586)  # radians
    scale: tuple[float, float] = (0.7, 1.3)


@dataclass
class ModelSettings:
    """UNet and KAF layer sizes (the paper's backbone, KAF layer and heads)."""

    in_channels: int = 1
    classes: int = 4
    width: int = 48  # f: encoder widths f, 2f, 4f, 8f; bottleneck 16f
    kaf_levels: tuple[bool, bool, bool, bool] = (True, True, True, True)
    attention_blocks: int = 16  # T self-attention blocks per KAF layer
    descriptor_dim: int = 256  # d
    heads: int = 4
    fusion_hidden: int = 64  # hidden width of the D_l fusion convolutions
    sampling: str = "nearest"  # "nearest" (paper) or "bilinear"
    sparse_fusion: bool = True  # D_l computed from the keypoints (same result as the dense path, far cheaper)
    kaf_decoder: str = "doubled"  # "doubled" (32f bottleneck, 2f decoder: authors, paper) or "plain" (UNet's)
    matching_blocks: int = 4  # alternating self/cross blocks of the matching head
    projection_dim: int = 512  # output of the global projection heads


@dataclass
class PretrainSettings:
    """Self-supervised pretraining (the paper's Eqs. 1-3 and protocol)."""

    epochs: int = 51
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-5
    temperature: float = 0.1
    base_temperature: float = 0.07  # Eq. 1 is scaled by temperature / base_temperature (authors' code)
    pcl_threshold: float = 0.35  # ACDC 0.35, CHD 0.1
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 0.01)  # (w1 L_PCL, w2 L_global, w3 L_local)
    sinkhorn_iterations: int = 100
    dustbin_init: float = 1.0
    matched_weight: float = 0.45
    unmatched_weight: float = 1.0
    log_clamp: float = -100.0
    matching_normalisation: str = "authors"  # Eq. 2: "authors" (per-group means) or "sum" (as printed)
    local_contrastive_weight: float = 0.0  # the authors' optional fourth term; off by default
    workers: int = 2
    mixed_precision: bool = True  # used only on CUDA
    checkpoint_every: int = 1  # epochs


@dataclass
class FinetuneSettings:
    """Fine-tuning on M labelled patients (the paper's experimental protocol)."""

    epochs: int = 201
    batch_size: int = 10
    lr: float = 5e-4
    lr_min: float = 5e-5
    weight_decay: float = 1e-5
    loss: str = "ce"  # "ce" (paper) or "dice_ce"
    selection: str = "validation"  # "validation" (this project) or "test_fold" (the authors', a leak)
    workers: int = 2
    mixed_precision: bool = True


@dataclass
class SplitSettings:
    """Patient-level folds and label budgets (the paper's experimental protocol)."""

    folds: int = 5
    fold_seed: int = 12345
    subset_seed: int = 1234
    validation_fraction: float = 0.2  # of the training patients, carved out for model selection
    labeled: tuple[int, ...] = (2, 6, 10, 15, 20, 30, 80)


@dataclass
class Settings:
    """Everything a run needs, under one name."""

    name: str = "paper_acdc"
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    keypoints: KeypointSettings = field(default_factory=KeypointSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)

    def __post_init__(self) -> None:
        validate_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Settings":
        return _from_dict(cls, values, path="settings")

    def replace(self, **changes: Any) -> "Settings":
        """A copy with dotted fields changed, e.g. ``replace(**{"model.width": 16})``."""
        values = self.to_dict()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = values
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise KeyError(f"unknown settings group {part!r} in {dotted!r}")
                node = node[part]
            if leaf not in node:
                raise KeyError(f"unknown setting {dotted!r}")
            node[leaf] = value
        return Settings.from_dict(values)


def _to_plain(value: Any) -> Any:
    """Tuples become lists so YAML and JSON write plain sequences."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_dict(cls: type, values: dict[str, Any], path: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    defaults = cls()
    kwargs = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{path}.{name}")
        elif isinstance(default, tuple) or (default is None and isinstance(value, list)):
            kwargs[name] = None if value is None else tuple(value)
        elif isinstance(default, float) and not isinstance(value, bool):
            try:  # YAML 1.1 reads "1e-05" as a string
                kwargs[name] = float(value)
            except (TypeError, ValueError):
                raise SettingsError(f"{path}.{name}: expected a number, got {value!r}") from None
        else:
            kwargs[name] = value
    return cls(**kwargs)


class SettingsError(ValueError):
    """A setting has a wrong type or a value out of range; the message names the setting and what was expected."""


def _at_least(low: float):
    return lambda v: v >= low, f"a number >= {low}" if isinstance(low, float) else f"an integer >= {low}"


def _pair(low_ok, text: str):
    return lambda v: len(v) == 2 and v[0] <= v[1] and all(low_ok(x) for x in v), text


_CHOICES = {
    "data.layout": ("auto", "acdc", "decathlon"),
    "data.neighbour_rule": ("adjacent", "fraction"),
    "model.sampling": ("nearest", "bilinear"),
    "model.kaf_decoder": ("doubled", "plain"),
    "finetune.loss": ("ce", "dice_ce"),
    "finetune.selection": ("validation", "test_fold"),
}
_POSITIVE = (lambda v: v > 0, "a number > 0")
_FRACTION = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_RULES = {  # dotted name -> (test, what was expected); types are checked against the defaults first
    "seed": _at_least(0),
    "data.patch": _at_least(8),
    "data.classes": _at_least(2),
    "data.neighbour_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "data.partitions": _at_least(1),
    "data.spacing_mm": (lambda v: v is None or (len(v) == 2 and min(v) > 0), "null or two numbers > 0 (row, col mm)"),
    "data.clip_percentiles": (lambda v: v is None or (len(v) == 2 and 0 <= v[0] < v[1] <= 100),
                              "null or two percentiles 0 <= low < high <= 100"),
    "keypoints.max_keypoints": _at_least(1),
    "keypoints.radius_forward": _POSITIVE,
    "keypoints.radius_reverse": _POSITIVE,
    "augment.p_deform": _FRACTION,
    "augment.elastic_alpha": _pair(lambda x: x >= 0, "two numbers 0 <= low <= high"),
    "augment.elastic_sigma": _pair(lambda x: x >= 0, "two numbers 0 <= low <= high"),
    "augment.rotation": _pair(lambda x: True, "two numbers low <= high (radians)"),
    "augment.scale": _pair(lambda x: x > 0, "two numbers 0 < low <= high"),
    "model.in_channels": _at_least(1),
    "model.classes": _at_least(2),
    "model.width": _at_least(1),
    "model.attention_blocks": _at_least(0),
    "model.descriptor_dim": _at_least(1),
    "model.heads": _at_least(1),
    "model.fusion_hidden": _at_least(1),
    "model.matching_blocks": _at_least(0),
    "model.projection_dim": _at_least(1),
    "pretrain.epochs": _at_least(1),
    "pretrain.batch_size": _at_least(1),
    "pretrain.lr": _POSITIVE,
    "pretrain.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "pretrain.weight_decay": _at_least(0.0),
    "pretrain.temperature": _POSITIVE,
    "pretrain.base_temperature": _POSITIVE,
    "pretrain.pcl_threshold": _at_least(0.0),
    "pretrain.loss_weights": (lambda v: min(v) >= 0 and sum(v) > 0, "three weights >= 0, not all 0"),
    "pretrain.sinkhorn_iterations": _at_least(1),
    "pretrain.matched_weight": _at_least(0.0),
    "pretrain.unmatched_weight": _at_least(0.0),
    "pretrain.log_clamp": (lambda v: v < 0, "a number < 0"),
    "pretrain.local_contrastive_weight": _at_least(0.0),
    "pretrain.workers": _at_least(0),
    "pretrain.checkpoint_every": _at_least(1),
    "finetune.epochs": _at_least(1),
    "finetune.batch_size": _at_least(1),
    "finetune.lr": _POSITIVE,
    "finetune.lr_min": _at_least(0.0),
    "finetune.weight_decay": _at_least(0.0),
    "finetune.workers": _at_least(0),
    "splits.folds": _at_least(2),
    "splits.validation_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "splits.labeled": (lambda v: len(v) > 0 and min(v) >= 1, "a list of integers >= 1"),
}
_VARIABLE_LENGTH = {"splits.labeled"}


def _type_problem(value: Any, default: Any, dotted: str) -> str | None:
    """What is wrong with ``value``'s type, judged by the field's default; ``None`` if nothing."""
    if default is None:
        return None if value is None or isinstance(value, (list, tuple)) else "null or a list"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple):
        if value is None and dotted in ("data.spacing_mm", "data.clip_percentiles"):
            return None
        if not isinstance(value, (list, tuple)):
            return "a list"
        if dotted not in _VARIABLE_LENGTH and len(value) != len(default):
            return f"a list of {len(default)} values"
        for item, reference in zip(value, default * len(value) if dotted in _VARIABLE_LENGTH else default):
            problem = _type_problem(item, reference, dotted)
            if problem:
                return f"a list of {problem.removeprefix('a ').removeprefix('an ')}s"
    return None


def validate_settings(settings: "Settings") -> "Settings":
    """Check every setting's type, choices and range; raise :class:`SettingsError` naming each bad one.

    Runs whenever a :class:`Settings` is built (presets, files, ``replace``, ``--set``), so a run
    never starts on settings it cannot honour.
    """
    problems = []
    for group in dataclasses.fields(settings):
        value = getattr(settings, group.name)
        members = [(f"{group.name}.{f.name}", getattr(value, f.name), getattr(type(value)(), f.name))
                   for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else \
                  [(group.name, value, getattr(Settings, group.name, None))]
        for dotted, item, default in members:
            expected = _type_problem(item, default, dotted)
            if expected is None and dotted in _CHOICES and item not in _CHOICES[dotted]:
                expected = "one of " + ", ".join(repr(c) for c in _CHOICES[dotted])
            if expected is None and dotted in _RULES and not _RULES[dotted][0](item):
                expected = _RULES[dotted][1]
            if expected is not None:
                problems.append(f"{dotted}: expected {expected}, got {item!r}")
    model = settings.model
    if not problems and model.descriptor_dim % model.heads:
        problems.append(f"model.heads: expected a divisor of model.descriptor_dim ({model.descriptor_dim}), "
                        f"got {model.heads}")
    if problems:
        raise SettingsError("; ".join(problems))
    return settings


def _tiny() -> Settings:
    return Settings(
        name="tiny",
        data=DataSettings(spacing_mm=(2.5, 2.5), patch=96),
        keypoints=KeypointSettings(max_keypoints=48, radius_forward=8.0, radius_reverse=12.0),
        model=ModelSettings(width=8, attention_blocks=2, descriptor_dim=32, heads=4, fusion_hidden=16,
                            matching_blocks=2, projection_dim=64),
        pretrain=PretrainSettings(epochs=3, batch_size=16, lr=0.01, sinkhorn_iterations=20, workers=0),
        finetune=FinetuneSettings(epochs=30, batch_size=10, lr=2e-3, lr_min=2e-4, workers=0),
        splits=SplitSettings(labeled=(1, 2, 4)),
    )


def _colab() -> Settings:
    return Settings(
        name="colab",
        data=DataSettings(spacing_mm=(1.5, 1.5), patch=192),
        keypoints=KeypointSettings(max_keypoints=128, radius_forward=16.0, radius_reverse=24.0),
        model=ModelSettings(width=24, attention_blocks=4, descriptor_dim=128, fusion_hidden=32,
                            matching_blocks=4, projection_dim=256),
        pretrain=PretrainSettings(epochs=20, batch_size=16, sinkhorn_iterations=50, workers=2),
        finetune=FinetuneSettings(epochs=60, batch_size=10, workers=2),
        splits=SplitSettings(labeled=(1, 2, 4, 8)),
    )


def _paper_acdc() -> Settings:
    # A validation share of 16 of the 80 training patients selects the epoch, so M is at most 64.
    return Settings(name="paper_acdc", splits=SplitSettings(labeled=(2, 6, 10, 15, 20, 30, 64)))


def _paper_chd() -> Settings:
    return Settings(
        name="paper_chd",
        data=DataSettings(layout="decathlon", spacing_mm=None, clip_percentiles=(1.0, 99.0), patch=512,
                          classes=8, neighbour_rule="fraction"),
        keypoints=KeypointSettings(radius_forward=20.0, radius_reverse=20.0),
        model=ModelSettings(classes=8, width=32),
        pretrain=PretrainSettings(pcl_threshold=0.1),
        finetune=FinetuneSettings(epochs=101, lr=5e-5, lr_min=5e-6),
        # 54-55 training patients per fold, 11 of them for validation: M is at most 43
        splits=SplitSettings(labeled=(2, 6, 10, 15, 20, 30, 43)),
    )


def _authors(base: Settings, name: str, labeled: tuple[int, ...]) -> Settings:
    """The authors' protocol: no validation share; the epoch is chosen on the test fold (a leak)."""
    settings = base.replace(**{"finetune.selection": "test_fold", "splits.validation_fraction": 0.0,
                               "splits.labeled": labeled})
    settings.name = name
    return settings


def _paper_acdc_authors() -> Settings:
    return _authors(_paper_acdc(), "paper_acdc_authors", (2, 6, 10, 15, 20, 30, 80))


def _paper_chd_authors() -> Settings:
    return _authors(_paper_chd(), "paper_chd_authors", (2, 6, 10, 15, 20, 30, 51))


PRESETS = {"tiny": _tiny, "colab": _colab, "paper_acdc": _paper_acdc, "paper_chd": _paper_chd,
           "paper_acdc_authors": _paper_acdc_authors, "paper_chd_authors": _paper_chd_authors}


def preset(name: str) -> Settings:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def save_settings(settings: Settings, path: str | Path) -> Path:
    """Write settings as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    path = Path(path)
    data = settings.to_dict()
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in {".yaml", ".yml"} else json.dumps(data, indent=2)
    return write_text(path, text)


def load_settings(path: str | Path) -> Settings:
    """Read settings written by :func:`save_settings` (YAML or JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read settings ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)  # JSON is a subset of YAML
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML or JSON ({error})") from None
    try:
        return Settings.from_dict(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None
