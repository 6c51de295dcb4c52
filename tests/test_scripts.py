"""The ablation script's variants: every one builds valid settings that differ from the preset as named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kpssl.settings import preset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_changes_only_what_it_names(ablation):
    base = preset("tiny")
    names = set()
    for name, (group, methods, changes) in ablation.VARIANTS.items():
        settings, concrete = ablation.variant_settings(base, changes)
        assert set(concrete) == set(changes)
        changed = {k for k in _flatten(base.to_dict()) if _flatten(base.to_dict())[k] != _flatten(settings.to_dict())[k]}
        assert changed == set(changes), name
        assert ablation.folder_name(name) not in names  # one folder per variant
        names.add(ablation.folder_name(name))
        if group in ("KAF levels", "attention blocks T"):
            assert methods == ["kaf_random"]  # architecture ablations: no pretraining, as in the paper


def test_radius_variants_scale_the_preset_radius(ablation):
    base = preset("tiny")
    settings, concrete = ablation.variant_settings(base, ablation.VARIANTS["radius x 2"][2])
    assert settings.keypoints.radius_forward == 2 * base.keypoints.radius_forward
    assert settings.keypoints.radius_reverse == 2 * base.keypoints.radius_reverse
    levels, _ = ablation.variant_settings(base, ablation.VARIANTS["without level 1"][2])
    assert levels.model.kaf_levels == (False, True, True, True)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out
