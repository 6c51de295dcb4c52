"""Run folders with an identity, atomic writes and stale temporaries, kill -9 at any moment (CPU, tiny runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kpssl.atomic import atomic_write, remove_stale_temporaries, temporary_name, write_json
from kpssl.cli import main
from kpssl.data.synthetic import write_synthetic_acdc
from kpssl.settings import preset
from kpssl.train.common import load_checkpoint
from kpssl.train.evaluate import load_finetuned
from kpssl.train.experiment import run_experiment
from kpssl.train.finetune import finetune
from kpssl.train.pretrain import pretrain
from kpssl.train.run import RunError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data.patch": 64, "keypoints.max_keypoints": 24, "model.width": 4, "model.descriptor_dim": 16,
    "model.attention_blocks": 1, "model.fusion_hidden": 8, "model.matching_blocks": 2, "model.projection_dim": 16,
    "pretrain.batch_size": 4, "pretrain.epochs": 2, "pretrain.workers": 0, "pretrain.sinkhorn_iterations": 5,
    "finetune.epochs": 1, "finetune.batch_size": 4, "finetune.workers": 0,
}


def small_settings(**changes):
    return preset("tiny").replace(**{**SMALL, **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_acdc(root, patients=6, seed=0)
    return root


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# --- one atomic writer ---------------------------------------------------------------------------
def test_atomic_write_uses_unique_temporaries_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "case.nii.gz"
    a, b = temporary_name(target), temporary_name(target)
    assert a != b and a.parent == tmp_path and a.name.endswith(".nii.gz") and a.name.startswith(".case.")
    write_json(tmp_path / "result.json", {"old": 1})

    def fails(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "result.json", fails)
    assert json.loads((tmp_path / "result.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".checkpoint.pt.tmp{pid}", tmp_path / f".encoder.pt.kpssl-tmp-{pid}-0a1b2c3d.pt",
             tmp_path / "result.json.tmp", tmp_path / f".case.tmp{pid}.nii.gz"]
    live = [tmp_path / f".checkpoint.kpssl-tmp-{os.getpid()}-00ff00ff.pt"]
    kept = [tmp_path / "checkpoint.pt", tmp_path / "notes.tmp.txt", tmp_path / "log.csv"]
    for path in stale + live + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(live + kept)


# --- case 3: pretraining resumed with other settings ---------------------------------------------
def test_pretrain_resume_refuses_other_settings_and_allows_more_epochs(data, tmp_path):
    settings = small_settings()
    out = tmp_path / "pre"
    pretrain(settings, data, "pcl", out, max_steps=2, progress=False, command="first")
    saved = (out / "settings.yaml").read_text()
    for change, named in ((("pretrain.lr", 0.47), "pretrain.lr (0.01 -> 0.47)"), (("seed", 3), "seed (0 -> 3)"),
                          (("pretrain.epochs", 4), "pretrain.epochs (2 -> 4)"),
                          (("model.width", 8), "model.width (4 -> 8)")):
        with pytest.raises(RunError) as caught:
            pretrain(small_settings(**dict([change])), data, "pcl", out, resume=True, progress=False)
        assert str(caught.value).startswith(f"{out / 'run.json'}: this folder holds another run, which differs in "
                                            f"{named}")
    with pytest.raises(RunError, match=r"differs in method \("):
        pretrain(settings, data, "gcl", out, resume=True, progress=False)
    assert (out / "settings.yaml").read_text() == saved  # a refused resume changes nothing
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2

    more = small_settings(**{"pretrain.epochs": 3})
    with pytest.raises(RunError, match=r"only pretrain.epochs or finetune.epochs may grow, with --allow-change"):
        pretrain(more, data, "pcl", out, resume=True, progress=False)
    with pytest.raises(RunError, match="only pretrain.epochs, finetune.epochs may change"):
        pretrain(more, data, "pcl", out, resume=True, progress=False, allow_change=("pretrain.lr",))
    result = pretrain(more, data, "pcl", out, resume=True, progress=False, allow_change=("pretrain.epochs",),
                      command="second", max_steps=3)
    assert result.steps == 3
    record = json.loads((out / "run.json").read_text())
    assert [c["command"] for c in record["commands"]] == ["first", "second"]
    assert record["commands"][1]["changes"] == {"pretrain.epochs": [2, 3]}
    assert record["identity"]["settings"]["pretrain"]["epochs"] == 3
    assert yaml.safe_load((out / "settings.yaml").read_text())["pretrain"]["epochs"] == 3


def test_a_folder_from_before_run_json_is_judged_by_its_checkpoint(data, tmp_path):
    out = tmp_path / "pre"
    pretrain(small_settings(), data, "pcl", out, max_steps=1, progress=False)
    (out / "run.json").unlink()
    with pytest.raises(RunError, match=r"differs in pretrain.lr \(0.01 -> 0.5\)"):
        pretrain(small_settings(**{"pretrain.lr": 0.5}), data, "pcl", out, resume=True, progress=False)


def test_cli_pretrain_width_change_on_resume_gives_the_identity_message(data, tmp_path, capsys):
    out = tmp_path / "pre"
    base = ["pretrain", "--data", str(data), "--method", "pcl", "--out", str(out), "--quiet", "--max-steps", "1"]
    small = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    assert main([*base, *small]) == 0
    capsys.readouterr()
    assert main([*base, *small, "--resume", "--set", "model.width=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kpssl: error: {out / 'run.json'}: this folder holds another run, which differs in "
                          "model.width (4 -> 8)") and "Traceback" not in err and "state_dict" not in err
    record = json.loads((out / "run.json").read_text())
    assert record["commands"][0]["command"].startswith("kpssl pretrain --data")


# --- case 1: fine-tuning resumed as another run ---------------------------------------------------
def test_finetune_resume_refuses_another_method_fold_or_budget(data, tmp_path):
    settings = small_settings(**{"finetune.epochs": 2})
    out = tmp_path / "ft"
    finetune(settings, data, "unet_random", 0, 1, out, max_epochs=1, progress=False)
    for method, fold, m, named in (("unet_random", 1, 2, "fold (0 -> 1), labeled (1 -> 2)"),
                                   ("kaf_random", 0, 1, 'method ("unet_random" -> "kaf_random")')):
        with pytest.raises(RunError) as caught:
            finetune(settings, data, method, fold, m, out, resume=True, progress=False)
        assert f"which differs in {named}" in str(caught.value)
    with pytest.raises(RunError, match=r"finetune.lr \(0.002 -> 0.1\)"):
        finetune(settings.replace(**{"finetune.lr": 0.1}), data, "unet_random", 0, 1, out, resume=True,
                 progress=False)
    result = finetune(settings, data, "unet_random", 0, 1, out, resume=True, progress=False)
    assert result.best_epoch in (1, 2)
    saved = json.loads((out / "result.json").read_text())
    assert (saved["fold"], saved["labeled"], saved["method"]) == (0, 1, "unet_random")


def test_finetune_refuses_another_encoder_on_resume(data, tmp_path):
    settings = small_settings(**{"finetune.epochs": 2})
    pretrain(settings, data, "pcl", tmp_path / "a", max_steps=1, progress=False)
    pretrain(settings.replace(seed=1), data, "pcl", tmp_path / "b", max_steps=1, progress=False)
    out = tmp_path / "ft"
    finetune(settings, data, "pcl", 0, 1, out, encoder=tmp_path / "a" / "encoder.pt", max_epochs=1, progress=False)
    with pytest.raises(RunError, match=r"differs in encoder \("):
        finetune(settings, data, "pcl", 0, 1, out, encoder=tmp_path / "b" / "encoder.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"best\.pt: not an encoder\.pt of kpssl pretrain"):
        finetune(settings, data, "pcl", 0, 1, tmp_path / "x", encoder=out / "best.pt", progress=False)
    model, loaded, state = load_finetuned(out / "best.pt")  # the one loader for a fine-tuned network
    assert state["method"] == "pcl" and loaded.model.width == 4
    with pytest.raises(RunError, match=r"encoder\.pt: an encoder \(encoder\.pt\) written by kpssl pretrain"):
        load_finetuned(tmp_path / "a" / "encoder.pt")


# --- case 2 and 7: the experiment folder --------------------------------------------------------------
def _count_finetunes(monkeypatch):
    import kpssl.train.experiment as module

    real, calls = module.finetune, []

    def counted(*args, **kwargs):
        calls.append(args[2:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "finetune", counted)
    return calls


def test_experiment_rerun_with_other_settings_is_refused_and_commands_are_recorded(data, tmp_path, monkeypatch):
    out = tmp_path / "table"
    calls = _count_finetunes(monkeypatch)
    run_experiment(small_settings(), data, ["unet_random"], [1], [0], out, progress=False, command="kpssl one",
                   meta={"command": "kpssl one"})
    assert len(calls) == 1
    with pytest.raises(RunError) as caught:
        run_experiment(small_settings(**{"finetune.epochs": 2}), data, ["unet_random"], [1], [0, 1], out,
                       progress=False, command="kpssl two")
    message = str(caught.value)
    assert message.startswith(f"{out}: holds runs this experiment cannot use (nothing was trained)")
    assert f"{out / 'finetune' / 'unet_random' / 'M1' / 'fold0' / 'run.json'}: made with finetune.epochs (1 -> 2)" \
        in message
    assert len(calls) == 1  # refused before any training

    rows = run_experiment(small_settings(), data, ["unet_random"], [1], [0, 1], out, progress=False,
                          command="kpssl three", meta={"command": "kpssl three"})
    assert len(calls) == 2 and rows[0]["folds"] == 2
    table = json.loads((out / "table.json").read_text())
    assert table["commands"] == ["kpssl one", "kpssl three"] and table["command"] == "kpssl three"
    assert table["settings_hash"] == json.loads((out / "run.json").read_text())["identity"]["settings_hash"]

    # a new table folder whose runs are fine but whose own record says otherwise is refused as well
    (out / "finetune").rename(tmp_path / "moved")
    with pytest.raises(RunError, match=r"run\.json: this folder holds a table made with finetune\.epochs \(1 -> 2\)"):
        run_experiment(small_settings(**{"finetune.epochs": 2}), data, ["unet_random"], [1], [0], out, progress=False)


@pytest.mark.parametrize("content, message", [
    ('{"method": "unet_random", "fo', "not valid JSON, truncated or corrupted"),
    ("{}", "incomplete, lacks method, fold, labeled, test, seconds"),
    ("[]", "expected a JSON object, got list"),
])
def test_experiment_with_a_broken_result_is_refused_before_training(data, tmp_path, monkeypatch, content, message):
    out = tmp_path / "table"
    broken = out / "finetune" / "unet_random" / "M1" / "fold1" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text(content)
    calls = _count_finetunes(monkeypatch)
    with pytest.raises(RunError) as caught:
        run_experiment(small_settings(), data, ["unet_random"], [1], [0, 1], out, progress=False)
    assert f"{broken}: {message}" in str(caught.value)
    assert calls == []


def test_cli_experiment_with_a_truncated_result_exits_2_without_traceback(data, tmp_path, capsys):
    out = tmp_path / "table"
    broken = out / "pretrain" / "pcl" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"method": "pcl", "st')
    assert main(["experiment", "--data", str(data), "--methods", "pcl", "--labeled", "1", "--folds", "0",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kpssl: error: ") and f"{broken}: not valid JSON" in err and "Traceback" not in err
    assert not (out / "finetune").exists()


# --- case 8: kill -9 at any moment ----------------------------------------------------------------
KILLED_RUN = """
import sys
from kpssl.settings import preset
from kpssl.train.pretrain import pretrain
settings = preset("tiny").replace(**{SETTINGS!r})
pretrain(settings, sys.argv[1], "pcl", sys.argv[2], progress=False, checkpoint_every_steps=1, max_steps=8)
"""


def test_kill_9_during_a_run_resumes_to_identical_weights_and_leaves_no_temporaries(data, tmp_path):
    settings = small_settings(**{"pretrain.epochs": 1})
    full = pretrain(settings, data, "pcl", tmp_path / "full", progress=False, max_steps=8)
    out = tmp_path / "killed"
    script = KILLED_RUN.replace("{SETTINGS!r}", repr({**SMALL, "pretrain.epochs": 1}))
    process = subprocess.Popen([sys.executable, "-c", script, str(data), str(out)], cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "checkpoint.pt").is_file() and len(list(out.glob(".checkpoint*"))) == 0:
            try:
                if load_checkpoint(out / "checkpoint.pt")["step"] >= 2:
                    break
            except ValueError:
                pass
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stranded = out / f".checkpoint.pt.tmp{process.pid}"  # what a kill inside a checkpoint write leaves
    stranded.write_bytes(b"half a checkpoint")
    resumed = pretrain(settings, data, "pcl", out, resume=True, progress=False, max_steps=8)
    assert resumed.steps == full.steps == 8
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(out / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_collect_table_refuses_a_row_mixing_settings_but_not_a_setting_added_later(tmp_path):
    from kpssl.train.experiment import collect_table

    def result(fold: int, **changes) -> None:
        settings = small_settings(**changes).to_dict()
        if fold == 2:
            del settings["finetune"]["lr_min"]  # written before this setting existed
        path = tmp_path / "finetune" / "unet_random" / "M1" / f"fold{fold}" / "result.json"
        write_json(path, {"method": "unet_random", "fold": fold, "labeled": 1, "seconds": 1.0, "settings": settings,
                          "test": {"dice_3d": 0.5 + fold / 10, "dice_2d_pooled": 0.5, "hd95_mm": 3.0}})

    result(0)
    result(1, **{"pretrain.lr": 0.5})  # pretraining settings do not change a unet_random run
    result(2)
    rows = collect_table(tmp_path)
    assert rows[0]["folds"] == 3 and rows[0]["dice_3d_mean"] == pytest.approx(0.6)
    result(3, **{"finetune.epochs": 9})
    with pytest.raises(RunError, match=r"fold3/result\.json: made with other settings or data than .*fold0/result\.json "
                                       r"\(differing: finetune\.epochs\)"):
        collect_table(tmp_path)


def test_neutral_settings_do_not_change_a_runs_identity(data):
    from kpssl.data.layouts import find_cases
    from kpssl.train.run import RunIdentity, identity_differences

    cases = find_cases(data)
    base = RunIdentity.of("finetune", "unet_random", small_settings(), cases, data, fold=0, labeled=1)
    same = small_settings(**{"finetune.workers": 2, "splits.labeled": [2, 6], "data.layout": "acdc",
                             "pretrain.lr": 0.3})  # pretraining settings are not read by fine-tuning
    other = RunIdentity.of("finetune", "unet_random", same, cases, data, fold=0, labeled=1)
    assert identity_differences(base.to_dict(), other) == {} and other.settings_hash == base.settings_hash
    changed = RunIdentity.of("finetune", "unet_random", small_settings(**{"finetune.lr": 0.3}), cases, data,
                             fold=0, labeled=1)
    assert identity_differences(base.to_dict(), changed) == {"finetune.lr": (0.002, 0.3)}


def test_stale_table_temporaries_are_removed_when_an_experiment_starts(data, tmp_path):
    out = tmp_path / "table"
    out.mkdir()
    stale = out / f".table.kpssl-tmp-{dead_pid()}-00000000.csv"
    stale.write_text("half a table")
    run_experiment(small_settings(), data, ["unet_random"], [1], [0], out, progress=False)
    assert not stale.exists() and (out / "table.csv").is_file()


def test_experiment_pretrains_on_a_separate_pool_and_keeps_the_folds_of_the_data(data, tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    write_synthetic_acdc(pool, patients=7, seed=0)  # a larger pool: the data's patients and more
    from kpssl.train import experiment as module

    seen = []
    real = module.pretrain

    def recorded(settings, folder, method, out, **kwargs):
        seen.append(Path(folder))
        return real(settings, folder, method, out, **kwargs)

    monkeypatch.setattr(module, "pretrain", recorded)
    calls = _count_finetunes(monkeypatch)
    out = tmp_path / "table"
    settings = small_settings(**{"pretrain.epochs": 1})
    run_experiment(settings, data, ["pcl"], [1], [0], out, pretrain_data=pool, progress=False)
    assert seen == [pool] and calls == [("pcl", 0, 1)]
    identity = json.loads((out / "pretrain" / "pcl" / "run.json").read_text())["identity"]
    own = json.loads((out / "run.json").read_text())["identity"]
    assert own["pretrain_data"] == identity["data"] != own["data"]  # pretrained on the pool, folds of the data
    result = json.loads((out / "finetune" / "pcl" / "M1" / "fold0" / "result.json").read_text())
    assert set(result["train_patients"] + result["test_patients"]) <= {p.name for p in (data / "training").iterdir()}

    # the same folder without the pool is another table, refused before training
    with pytest.raises(RunError, match=r"pretrain/pcl/run\.json: made with data \("):
        run_experiment(settings, data, ["pcl"], [1], [0], out, progress=False)
    with pytest.raises(ValueError, match="separate pretraining pool needs pretrain_scope 'all'"):
        run_experiment(settings, data, ["pcl"], [1], [0], tmp_path / "other", pretrain_data=pool,
                       pretrain_scope="train", progress=False)
