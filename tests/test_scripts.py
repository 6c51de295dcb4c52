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


def test_finetune_epochs_table_reads_the_runs(tmp_path):
    """scripts/finetune_epochs.py --collect-only: one row per finished run, the chosen epoch flagged when
    it is the last one, the commands as the runs recorded them; unfinished runs are left out."""
    import json
    import subprocess
    import sys

    script = SCRIPT.parent / "finetune_epochs.py"
    runs = tmp_path / "runs"
    for method, epochs, best in (("unet_random", 30, 30), ("unet_random", 60, 41)):
        folder = runs / f"{method}_M1_fold0_e{epochs}"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"commands": [{"command": f"kpssl finetune e{epochs}"}]}))
        (folder / "result.json").write_text(json.dumps({
            "method": method, "labeled": 1, "fold": 0, "best_epoch": best, "selection_dice_3d": 0.5,
            "seconds": 10.0, "test": {"dice_3d": 0.4, "dice_2d_pooled": 0.45, "hd95_mm": 20.0}}))
    (runs / "unet_random_M4_fold0_e30").mkdir()  # unfinished: no result.json
    table = tmp_path / "table"
    subprocess.run([sys.executable, str(script), "--data", "unused", "--methods", "unet_random", "--labeled", "1",
                    "4", "--epochs", "30", "60", "--out", str(runs), "--table", str(table), "--collect-only"],
                   check=True, capture_output=True, text=True)
    written = json.loads(table.with_suffix(".json").read_text())
    assert [(r["epochs"], r["best_epoch"], r["chose_last"]) for r in written["rows"]] == [(30, 30, True), (60, 41, False)]
    assert written["runs"] == ["kpssl finetune e30", "kpssl finetune e60"]
    assert written["seconds_in_runs"] == 20.0
    assert table.with_suffix(".csv").read_text().splitlines()[0].startswith("method,M,fold,epochs,best_epoch")
