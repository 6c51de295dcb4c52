import json

import pytest

from kpssl.settings import PRESETS, Settings, SettingsError, load_settings, preset, save_settings, validate_settings


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, name, suffix):
    settings = preset(name)
    path = save_settings(settings, tmp_path / f"settings{suffix}")
    assert load_settings(path) == settings
    assert not list(tmp_path.glob("*.tmp"))


def test_paper_presets_hold_the_spec_numbers():
    acdc, chd = preset("paper_acdc"), preset("paper_chd")
    assert (acdc.model.width, acdc.model.classes, acdc.data.patch) == (48, 4, 352)
    assert (chd.model.width, chd.model.classes, chd.data.patch) == (32, 8, 512)
    assert acdc.data.spacing_mm == (1.25, 1.25) and chd.data.clip_percentiles == (1.0, 99.0)
    assert (acdc.model.attention_blocks, acdc.model.descriptor_dim, acdc.model.heads) == (16, 256, 4)
    assert acdc.pretrain.loss_weights == (1.0, 1.0, 0.01)
    assert (acdc.pretrain.pcl_threshold, chd.pretrain.pcl_threshold) == (0.35, 0.1)
    assert (acdc.pretrain.lr, acdc.pretrain.epochs, acdc.pretrain.batch_size) == (0.002, 51, 32)
    assert (acdc.finetune.lr, acdc.finetune.lr_min, acdc.finetune.epochs) == (5e-4, 5e-5, 201)
    assert (chd.finetune.lr, chd.finetune.lr_min, chd.finetune.epochs) == (5e-5, 5e-6, 101)
    assert (acdc.splits.fold_seed, acdc.splits.subset_seed) == (12345, 1234)
    assert acdc.finetune.selection == "validation"
    assert (acdc.pretrain.temperature, acdc.pretrain.base_temperature) == (0.1, 0.07)
    assert acdc.pretrain.matching_normalisation == "authors"
    authors_acdc, authors_chd = preset("paper_acdc_authors"), preset("paper_chd_authors")
    assert authors_acdc.splits.labeled == (2, 6, 10, 15, 20, 30, 80)
    assert authors_chd.splits.labeled == (2, 6, 10, 15, 20, 30, 51)
    assert authors_acdc.finetune.selection == "test_fold" and authors_acdc.splits.validation_fraction == 0
    assert authors_acdc.model == acdc.model and authors_chd.data == chd.data


# patients each preset is made for: ACDC 100, CHD 68, the built-in synthetic data 20
PRESET_PATIENTS = {"tiny": 20, "colab": 20, "paper_acdc": 100, "paper_acdc_authors": 100, "paper_chd": 68,
                   "paper_chd_authors": 68}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_budget_is_runnable(name):
    from kpssl.data.splits import fold_split, labelled_subset

    settings = preset(name)
    patients = [f"patient{i:03d}" for i in range(1, PRESET_PATIENTS[name] + 1)]
    for fold in range(settings.splits.folds):
        split = fold_split(patients, fold, settings.splits)
        assert bool(split.validation) == (settings.finetune.selection == "validation")
        for m in settings.splits.labeled:
            assert len(labelled_subset(split, m, settings.splits.subset_seed)) == m


def test_presets_are_fresh_copies():
    a = preset("tiny")
    a.model.width = 999
    assert preset("tiny").model.width != 999


def test_replace_dotted():
    s = preset("tiny").replace(**{"model.width": 4, "seed": 3})
    assert s.model.width == 4 and s.seed == 3 and s.data == preset("tiny").data
    with pytest.raises(KeyError):
        preset("tiny").replace(**{"model.nope": 1})


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"widht": 3}}))
    with pytest.raises(ValueError, match=r"bad\.json.*widht"):
        load_settings(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_settings(broken)
    with pytest.raises(ValueError, match="missing.yaml"):
        load_settings(tmp_path / "missing.yaml")


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("name: mine\nmodel:\n  width: 12\n")
    s = load_settings(path)
    assert s.name == "mine" and s.model.width == 12 and s.model.classes == Settings().model.classes


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("finetune.loss", "foo", "finetune.loss: expected one of 'ce', 'dice_ce', got 'foo'"),
    ("augment.flip", "maybe", "augment.flip: expected true or false, got 'maybe'"),
    ("pretrain.epochs", 0, "pretrain.epochs: expected an integer >= 1, got 0"),
    ("pretrain.batch_size", 0, "pretrain.batch_size: expected an integer >= 1, got 0"),
    ("finetune.batch_size", -2, "finetune.batch_size: expected an integer >= 1, got -2"),
    ("model.width", "abc", "model.width: expected an integer, got 'abc'"),
    ("model.width", 8.5, "model.width: expected an integer, got 8.5"),
    ("data.layout", "nifti", "data.layout: expected one of 'auto', 'acdc', 'decathlon', got 'nifti'"),
    ("finetune.selection", "test", "finetune.selection: expected one of 'validation', 'test_fold', got 'test'"),
    ("model.sampling", "cubic", "model.sampling: expected one of 'nearest', 'bilinear', got 'cubic'"),
    ("pretrain.lr", -0.1, "pretrain.lr: expected a number > 0, got -0.1"),
    ("pretrain.temperature", 0, "pretrain.temperature: expected a number > 0, got 0"),
    ("augment.p_deform", 1.5, "augment.p_deform: expected a number in [0, 1], got 1.5"),
    ("splits.validation_fraction", 1.0, "splits.validation_fraction: expected a number in [0, 1), got 1.0"),
    ("splits.folds", 1, "splits.folds: expected an integer >= 2, got 1"),
    ("pretrain.loss_weights", [0, 0, 0], "pretrain.loss_weights: expected three weights >= 0, not all 0"),
    ("model.kaf_levels", [True, True], "model.kaf_levels: expected a list of 4 values, got (True, True)"),
    ("data.clip_percentiles", [99, 1], "data.clip_percentiles: expected null or two percentiles"),
    ("model.heads", 5, "model.heads: expected a divisor of model.descriptor_dim (32), got 5"),
])
def test_bad_values_are_refused_naming_the_setting(key, value, message):
    with pytest.raises(SettingsError) as caught:
        preset("tiny").replace(**{key: value})
    assert str(caught.value).startswith(message)


def test_every_bad_value_is_named_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("finetune:\n  loss: foo\naugment:\n  flip: maybe\n")
    with pytest.raises(ValueError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and "augment.flip: expected true or false" in text
    assert "finetune.loss: expected one of 'ce', 'dice_ce', got 'foo'" in text


def test_good_values_pass():
    settings = preset("tiny").replace(**{"finetune.loss": "dice_ce", "augment.flip": False, "data.layout": "acdc",
                                         "data.spacing_mm": None, "model.attention_blocks": 0, "seed": 7})
    assert validate_settings(settings) is settings
    assert preset("tiny").data.layout == "auto" and preset("paper_chd").data.layout == "decathlon"
