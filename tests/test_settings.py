import json

import pytest

from kpssl.settings import PRESETS, Settings, load_settings, preset, save_settings


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
