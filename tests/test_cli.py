"""The command line end to end, and the book's one repository address."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kpssl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["synth", "--out", str(out), "--patients", "3", "--seed", "4", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "training").iterdir()) == ["patient001", "patient002", "patient003"]
    assert main(["check", str(out)]) == 0
    assert "3 patients, 6 labelled volumes" in capsys.readouterr().out


def test_check_exits_non_zero_with_one_line_per_problem(tmp_path, capsys):
    out = tmp_path / "synthetic"
    main(["synth", "--out", str(out), "--patients", "2", "--quiet"])
    label = next((out / "training" / "patient002").glob("*_gt.nii.gz"))
    label.unlink()
    capsys.readouterr()
    assert main(["check", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{label}: label file not found")


def test_python_dash_m_and_summary():
    done = subprocess.run([sys.executable, "-m", "kpssl", "summary", "--preset", "paper_acdc"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert "106.5" in done.stdout and "17.4" in done.stdout  # millions, as the paper's 106.8M and 17.5M


def test_bad_arguments_fail_cleanly(tmp_path, capsys):
    assert main(["check", str(tmp_path / "absent")]) == 1
    assert "folder not found" in capsys.readouterr().err


def test_chapters_use_the_repository_address_of_the_config():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        setup = next(c for c in cells if c["cell_type"] == "code")
        found = re.findall(r'REPOSITORY = "([^"]+)"', "".join(setup["source"]))
        assert found == [url], notebook.name


def test_set_changes_settings_and_rejects_unknown_keys():
    from kpssl.cli import _settings, build_parser

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--data", "d", "--method", "kaf", "--out", "o", "--set",
                              "model.attention_blocks=4", "--set", "model.kaf_levels=[false, true, true, true]",
                              "--set", "pretrain.loss_weights=[1, 0, 0]"])
    settings = _settings(args)
    assert settings.model.attention_blocks == 4
    assert settings.model.kaf_levels == (False, True, True, True)
    assert tuple(settings.pretrain.loss_weights) == (1, 0, 0)
    assert settings.model.width == 8  # the rest is the tiny preset
    for bad in ("model.no_such_field=1", "model.width"):
        args = parser.parse_args(["pretrain", "--data", "d", "--method", "kaf", "--out", "o", "--set", bad])
        with pytest.raises(SystemExit, match="--set"):
            _settings(args)
