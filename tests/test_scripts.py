"""The ablation script's variants: every one builds valid settings that differ from the preset as named."""

from __future__ import annotations

import importlib.util
import sys
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


SMALL_SETTINGS = ["data.patch=64", "keypoints.max_keypoints=24", "model.width=4", "model.descriptor_dim=16",
                  "model.attention_blocks=1", "model.fusion_hidden=8", "model.matching_blocks=2",
                  "model.projection_dim=16", "pretrain.batch_size=4", "pretrain.sinkhorn_iterations=5",
                  "finetune.batch_size=4"]


def test_budget_study_runs_every_unit_once_and_tabulates_them(tmp_path):
    """scripts/budget_study.py at toy size: two workers, two folds sharing each encoder, a separate pool.
    Each encoder is pretrained once (never by two units at once), every fine-tuning lands in the table
    with its pool and budget, and the probes cover every encoder and the random initialisation."""
    import json
    import shlex
    import subprocess

    from kpssl.data.synthetic import write_synthetic_acdc

    data, pool = tmp_path / "data", tmp_path / "pool"
    write_synthetic_acdc(data, patients=6, seed=0)
    write_synthetic_acdc(pool, patients=8, seed=0)
    out, table = tmp_path / "study", tmp_path / "table"
    command = [sys.executable, str(SCRIPT.parent / "budget_study.py"), "--data", str(data), "--pool", str(pool),
               "--methods", "pcl", "--references", "unet_random", "--budgets", "1", "--finetune-epochs", "1",
               "--labeled", "1", "--folds", "0", "1", "--out", str(out), "--table", str(table), "--workers", "2",
               "--export", str(tmp_path / "trained"), *[word for change in SMALL_SETTINGS for word in ("--set", change)]]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads(table.with_suffix(".json").read_text())
    keys = sorted((r["method"], r["pool"], r["pretrain_epochs"], r["fold"]) for r in written["rows"])
    assert keys == [("pcl", 6, 1, 0), ("pcl", 6, 1, 1), ("pcl", 8, 1, 0), ("pcl", 8, 1, 1),
                    ("unet_random", 0, 0, 0), ("unet_random", 0, 0, 1)]
    for cell in ("pool6_e1", "pool8_e1"):
        commands = json.loads((out / cell / "pretrain" / "pcl" / "run.json").read_text())["commands"]
        assert len(commands) == 1  # pretrained once, by the first unit of the cell
    steps = {r["pool"]: r["pretrain_steps"] for r in written["rows"] if r["method"] == "pcl"}
    assert steps[8] > steps[6] > 0  # the larger pool gives more steps per epoch
    assert written["units"] == {"planned": 6, "finished": 6}
    assert [(p["method"], p["pool"]) for p in written["probes"]] == [
        ("chance", 0), ("unet_random", 0), ("pcl", 6), ("pcl", 8)]
    assert any("--pretrain-data" in c for c in written["runs"]) and written["seconds_in_runs"] > 0
    # the recorded command recomputes the study; the one that wrote the file (here with --export) beside it
    assert "--export" not in written["command"] and "--export" in written["written_by"]
    for row in written["rows"]:  # the last of fine-tuning's 1 epoch is its final tenth
        assert row["late_gain"] >= 0 and (row["late_gain"] > 0) <= (row["best_epoch"] == row["epochs"])
    assert len(written["chosen_epochs"]["late_gain_quartiles"]) == 5
    recorded = shlex.split(written["command"])[2:]
    assert recorded == command[2:command.index("--export")] + command[command.index("--export") + 2:]
    # the networks the book shows: the random UNet fine-tuned (no KAF in this toy study, so no more)
    from kpssl.train.evaluate import load_finetuned

    trained = json.loads((tmp_path / "trained" / "trained.json").read_text())["networks"]
    assert [(n["file"], n["cell"]) for n in trained] == [("unet_random_M1_fold0.pt", "random")]
    network, _, state = load_finetuned(tmp_path / "trained" / "unet_random_M1_fold0.pt")
    assert state["compact"]["dtype"] == "float16" and trained[0]["test_dice_3d"] == \
        round(json.loads((out / "random" / "finetune" / "unet_random" / "M1" / "fold0" / "result.json").read_text())
              ["test"]["dice_3d"], 4)
    # run again: nothing left to do, the same table
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and "6 of 6 units finished; running 0" in again.stdout
    assert json.loads(table.with_suffix(".json").read_text())["rows"] == written["rows"]


def test_budget_study_late_gain_reads_the_log(tmp_path, monkeypatch):
    """late_gain: the best validation Dice of all epochs minus the best up to 90 % of them (epoch 0, the
    initialisation, included), 0 for a run that peaked early; an epoch without a score is an error naming
    the log."""
    spec = importlib.util.spec_from_file_location("budget_study", SCRIPT.parent / "budget_study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "budget_study", study)  # its dataclasses look their module up
    spec.loader.exec_module(study)
    log = tmp_path / "log.csv"

    def write(scores: list[str]) -> None:
        rows = [f"{epoch},{3 * epoch},0.001,0.5,{score}" for epoch, score in enumerate(scores)]
        log.write_text("epoch,step,lr,loss,selection_dice,seconds\n" + "".join(f"{r},0.1\n" for r in rows))

    # 10 epochs: epochs 0-9 are the first 90 %, epoch 10 the final tenth
    write(["0.1", "0.5", "0.7", "0.6", "0.6", "0.6", "0.6", "0.6", "0.6", "0.65", "0.75"])
    assert study.late_gain(log, 10) == pytest.approx(0.75 - 0.7, abs=1e-12)
    write(["0.1", "0.5", "0.8", "0.6", "0.6", "0.6", "0.6", "0.6", "0.6", "0.65", "0.75"])
    assert study.late_gain(log, 10) == 0.0  # chose epoch 2
    write(["0.9", "0.5"])
    assert study.late_gain(log, 1) == 0.0  # the initialisation counts among the early epochs
    write(["0.1", "0.5", "", "0.6"])
    with pytest.raises(ValueError, match=r"log\.csv: no validation Dice for epochs \[2\]"):
        study.late_gain(log, 3)
