"""The command line end to end, and the book's one repository address."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kpssl.cli import main
from kpssl.settings import SettingsError

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
        with pytest.raises(SettingsError, match="--set"):
            _settings(args)


# --- validation before work, and no traceback for user errors ----------------------------------------
def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("kpssl: error: ") and "Traceback" not in err
    return err.removeprefix("kpssl: error: ")


@pytest.mark.parametrize("change, message", [
    ("pretrain.epochs=0", "pretrain.epochs: expected an integer >= 1, got 0"),
    ("pretrain.batch_size=0", "pretrain.batch_size: expected an integer >= 1, got 0"),
    ("model.width=abc", "model.width: expected an integer, got 'abc'"),
    ("finetune.loss=foo", "finetune.loss: expected one of 'ce', 'dice_ce', got 'foo'"),
    ("augment.flip=maybe", "augment.flip: expected true or false, got 'maybe'"),
    ("model.no_such_field=1", "unknown setting 'model.no_such_field'"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(tmp_path / "no_data_needed"), "--method", "pcl", "--out", str(out),
                 "--quiet", "--set", change])
    assert code == 2
    assert _error(capsys) == f"--set: {message}"
    assert not out.exists()


@pytest.mark.parametrize("option", ["--max-steps", "--max-epochs", "--labeled"])
def test_negative_counts_are_refused_by_the_parser(tmp_path, capsys, option):
    command = "pretrain" if option == "--max-steps" else "finetune"
    argv = [command, "--data", str(tmp_path), "--method", "pcl", "--out", str(tmp_path / "o"), option, "-5"]
    if command == "finetune" and option != "--labeled":
        argv += ["--labeled", "1"]
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert f"{option}: expected a whole number >= 1, got -5" in capsys.readouterr().err


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", "--out", str(data), "--patients", "2", "--quiet"])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    for command in (["pretrain", "--method", "pcl"], ["finetune", "--method", "unet_random", "--labeled", "1"],
                    ["experiment", "--methods", "unet_random"]):
        assert main([*command, "--data", str(data), "--out", str(blocker), "--quiet"]) == 2
        assert _error(capsys) == f"--out {blocker}: exists and is not a folder"
        assert main([*command, "--data", str(data), "--out", str(blocker / "run"), "--quiet"]) == 2
        assert _error(capsys) == f"--out {blocker / 'run'}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "not a folder"


def test_evaluate_out_folder_is_refused_before_evaluating(tmp_path, capsys):
    code = main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "never_read.pt"),
                 "--out", str(tmp_path)])
    assert code == 2
    assert _error(capsys).startswith(f"--out {tmp_path}: is a folder; expected a file name for the JSON")


def test_evaluate_refuses_a_pretraining_encoder(tmp_path, capsys):
    import torch

    from kpssl.settings import preset
    from kpssl.train.networks import PretrainNetwork

    settings = preset("tiny")
    network = PretrainNetwork("pcl", settings.model, settings.pretrain)
    encoder = tmp_path / "encoder.pt"  # as kpssl pretrain writes it (an untrained decoder inside)
    torch.save({"method": "pcl", "model": network.encoder_state(), "settings": settings.to_dict()}, encoder)
    main(["synth", "--out", str(tmp_path / "data"), "--patients", "5", "--quiet"])
    capsys.readouterr()
    assert main(["evaluate", "--data", str(tmp_path / "data"), "--checkpoint", str(encoder)]) == 2
    assert _error(capsys) == (f"{encoder}: an encoder (encoder.pt) written by kpssl pretrain, not a fine-tuned "
                              "network; evaluation needs the best.pt of a kpssl finetune run")


def test_keypoints_takes_the_settings_options_and_detects_decathlon(tiny_decathlon, capsys):
    assert main(["keypoints", str(tiny_decathlon), "--quiet", "--set", "keypoints.max_keypoints=8",
                 "--set", "data.spacing_mm=null"]) == 0
    assert (tiny_decathlon / ".kpssl_cache").is_dir()
    assert main(["keypoints", str(tiny_decathlon), "--quiet", "--set", "keypoints.max_keypoints=0"]) == 2
    assert _error(capsys) == "--set: keypoints.max_keypoints: expected an integer >= 1, got 0"


def test_data_errors_exit_2_with_the_message_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    assert main(["pretrain", "--data", str(tmp_path / "absent"), "--method", "pcl", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert _error(capsys) == f"{tmp_path / 'absent'}: folder not found"

    import kpssl.cli as cli
    import numpy as np

    def buggy(args):
        return np.zeros(3) + np.zeros(4)  # a ValueError raised inside numpy: a bug, not a user error

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser(), buggy))
    with pytest.raises(ValueError, match="broadcast"):
        main(["summary"])


def _with_handler(parser, handler):
    parser.set_defaults(handler=handler)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(handler=handler)
    return parser


def test_interrupt_exits_130_with_a_hint(capsys, monkeypatch):
    import kpssl.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser(), interrupted))
    assert main(["summary"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_the_library_knows_the_repository_address_of_the_config():
    from kpssl.book import REPOSITORY, RESULTS_URL

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    assert REPOSITORY == config["url"]
    owner_name = config["url"].removeprefix("https://github.com/")
    assert RESULTS_URL == f"https://raw.githubusercontent.com/{owner_name}/{config['branch']}/book/results"


def test_fetch_results_reads_the_checkout_or_downloads_once_outside_it(tmp_path, monkeypatch):
    import torch

    from kpssl.book import ChapterEnvironment, fetch_results
    from kpssl.settings import preset

    inside = ChapterEnvironment(preset("tiny"), torch.device("cpu"), tmp_path, ROOT)
    assert fetch_results(inside, "tiny_table.csv") == ROOT / "book" / "results"
    with pytest.raises(FileNotFoundError, match="missing committed results no_such.csv"):
        fetch_results(inside, "no_such.csv")

    # outside a checkout (as on Colab): downloaded into ./kpssl_results, here from a file:// address
    outside = ChapterEnvironment(preset("tiny"), torch.device("cpu"), tmp_path, None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KPSSL_RESULTS_URL", (ROOT / "book" / "results").as_uri())
    folder = fetch_results(outside, "tiny_table.csv", "tiny_table.json")
    assert folder == tmp_path / "kpssl_results"
    assert (folder / "tiny_table.csv").read_bytes() == (ROOT / "book" / "results" / "tiny_table.csv").read_bytes()
    monkeypatch.setenv("KPSSL_RESULTS_URL", (tmp_path / "nowhere").as_uri())
    assert fetch_results(outside, "tiny_table.csv") == folder  # kept: not downloaded again
    with pytest.raises(OSError, match=r"absent\.csv: cannot download the committed result from file:"):
        fetch_results(outside, "absent.csv")
    assert sorted(p.name for p in folder.iterdir()) == ["tiny_table.csv", "tiny_table.json"]  # nothing partial
