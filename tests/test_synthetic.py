"""The built-in synthetic cardiac cine data set: determinism, anatomy, physiology and the ACDC layout."""

from __future__ import annotations

import numpy as np
import pytest

from kpssl.data import synthetic
from kpssl.data.layouts import acdc_cases, read_info_cfg
from kpssl.data.nifti import DataError, read_volume
from kpssl.data.synthetic import GROUPS, SyntheticPatient, synthesize_patient, write_synthetic_acdc


_CACHE: dict[tuple[int, int], SyntheticPatient] = {}


def _cached(index: int, seed: int = 0) -> SyntheticPatient:
    """``synthesize_patient`` computed once per test module (patients are deterministic)."""
    if (index, seed) not in _CACHE:
        _CACHE[index, seed] = synthesize_patient(index, seed)
    return _CACHE[index, seed]


@pytest.fixture(scope="module")
def patients() -> dict[int, SyntheticPatient]:
    """One patient of each group (indices 1..5 cycle NOR, MINF, DCM, HCM, ARV)."""
    return {index: _cached(index) for index in range(1, 6)}


@pytest.fixture
def cached_writer(monkeypatch):
    """The writer draws its patients from the cache; the writing itself is real."""
    monkeypatch.setattr(synthetic, "synthesize_patient", _cached)


def _volumes(patient: SyntheticPatient) -> list[np.ndarray]:
    return [patient.ed_image, patient.ed_label, patient.es_image, patient.es_label]


# --- determinism ------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_arrays(patients):
    """Computed afresh, not from the cache."""
    again = synthesize_patient(2, seed=0)
    for first, second in zip(_volumes(patients[2]), _volumes(again)):
        np.testing.assert_array_equal(first, second)
    assert again.info() == patients[2].info()
    assert again.spacing == patients[2].spacing


def test_different_seed_or_index_gives_a_different_patient(patients):
    other_seed = _cached(2, seed=1)
    assert other_seed.ed_image.shape != patients[2].ed_image.shape or not np.array_equal(
        other_seed.ed_image, patients[2].ed_image)
    assert patients[1].ed_image.shape != patients[2].ed_image.shape or not np.array_equal(
        patients[1].ed_image, patients[2].ed_image)


def test_patient_does_not_depend_on_how_many_are_written(tmp_path):
    write_synthetic_acdc(tmp_path / "one", patients=1, seed=3)
    write_synthetic_acdc(tmp_path / "two", patients=2, seed=3)
    for name in ("patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz"):
        a = read_volume(tmp_path / "one" / "training" / "patient001" / name).array
        b = read_volume(tmp_path / "two" / "training" / "patient001" / name).array
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_refused():
    for index in (0, -1, 1000, 1.5, True):
        with pytest.raises(ValueError, match="index"):
            synthesize_patient(index)
    with pytest.raises(ValueError, match="seed"):
        synthesize_patient(1, seed=-1)


# --- what a patient looks like ------------------------------------------------------------------------------
def test_shapes_types_and_metadata(patients):
    for index, patient in patients.items():
        assert patient.patient_id == f"patient{index:03d}"
        assert patient.group == GROUPS[(index - 1) % 5]
        z, h, w = patient.ed_image.shape
        assert 8 <= z <= 12 and 160 <= h <= 208 and 160 <= w <= 208
        for volume in _volumes(patient):
            assert volume.shape == (z, h, w)
        assert patient.ed_image.dtype == np.float32 and patient.ed_label.dtype == np.uint8
        for image in (patient.ed_image, patient.es_image):
            assert np.all(np.isfinite(image)) and image.min() >= 0
            np.testing.assert_array_equal(image, np.round(image))  # whole scanner units
            assert 300 < np.percentile(image, 99.5) < 3000
        dz, dy, dx = patient.spacing
        assert 5.0 <= dz <= 10.0 and 1.3 <= dy <= 1.7 and dy == dx
        assert patient.ed_frame == 1 and 8 <= patient.es_frame <= 15 and 20 <= patient.nb_frame <= 30
        assert patient.es_frame < patient.nb_frame
        assert 140 < patient.height < 210 and 40 < patient.weight < 150


def test_label_values_and_classes_in_mid_ventricular_slices(patients):
    for patient in patients.values():
        for label in (patient.ed_label, patient.es_label):
            assert set(np.unique(label)) <= {0, 1, 2, 3}
            z = label.shape[0]
            for mid in range(z // 3, z // 2 + 1):
                assert set(np.unique(label[mid])) == {0, 1, 2, 3}, (patient.patient_id, mid)


def test_myocardium_surrounds_the_lv_cavity(patients):
    """Mid-ventricular LV cavity pixels touch only LV or myocardium (the ring is closed)."""
    for patient in patients.values():
        label = patient.ed_label[patient.ed_label.shape[0] // 2]
        lv = label == 3
        neighbours = np.zeros_like(lv)
        for axis in (0, 1):
            for step in (-1, 1):
                neighbours |= np.roll(lv, step, axis=axis)
        assert set(np.unique(label[neighbours & ~lv])) <= {2}, patient.patient_id


def test_lv_shrinks_from_base_to_apex(patients):
    for patient in patients.values():
        area = (patient.ed_label == 3).sum(axis=(1, 2))
        third = len(area) // 3
        assert area[:third].mean() > area[-third:].mean() * 1.5, patient.patient_id
        assert area[-1] < area.max() / 3
        rv = (patient.ed_label == 1).sum(axis=(1, 2))
        assert rv[-1] == 0 or rv[-1] < area[-1]  # the RV ends before the LV


def _ejection_fraction(patient: SyntheticPatient, value: int) -> float:
    return 1 - (patient.es_label == value).sum() / (patient.ed_label == value).sum()


@pytest.mark.parametrize("index, lv_range, rv_range", [
    (1, (0.50, 0.75), (0.40, 0.65)),  # NOR
    (2, (0.15, 0.48), (0.30, 0.60)),  # MINF
    (3, (0.05, 0.40), (0.20, 0.55)),  # DCM
    (4, (0.60, 0.85), (0.40, 0.70)),  # HCM
    (5, (0.45, 0.70), (0.10, 0.42)),  # ARV
])
def test_ejection_fractions_are_plausible_for_the_group(patients, index, lv_range, rv_range):
    patient = patients[index]
    assert lv_range[0] < _ejection_fraction(patient, 3) < lv_range[1]
    assert rv_range[0] < _ejection_fraction(patient, 1) < rv_range[1]
    assert abs(_ejection_fraction(patient, 3) - patient.anatomy["target_lv_ef"]) < 0.04


def test_groups_differ_as_in_acdc(patients):
    nor, minf, dcm, hcm, arv = (patients[i] for i in range(1, 6))
    volume = {i: (p.ed_label == 3).sum() * np.prod(p.spacing) for i, p in patients.items()}  # LV EDV, mm^3
    assert volume[3] > volume[1] and volume[4] < volume[1]  # DCM dilated, HCM small cavity
    assert hcm.anatomy["wall_mm"] > nor.anatomy["wall_mm"] > dcm.anatomy["wall_mm"]
    rv_volume = (arv.ed_label == 1).sum() * np.prod(arv.spacing)
    assert rv_volume > 1.5 * (arv.ed_label == 3).sum() * np.prod(arv.spacing)  # ARV: enlarged RV
    assert _ejection_fraction(minf, 3) < _ejection_fraction(nor, 3)


def test_myocardial_volume_is_roughly_conserved_from_ed_to_es(patients):
    for patient in patients.values():
        ratio = (patient.es_label == 2).sum() / (patient.ed_label == 2).sum()
        assert 0.8 < ratio < 1.25, patient.patient_id


def test_image_has_the_contrast_of_bssfp_cine(patients):
    """Blood is bright, myocardium dark grey, and the lungs darker still."""
    for patient in patients.values():
        image, label = patient.ed_image, patient.ed_label
        blood = np.median(image[label == 3])
        myocardium = np.median(image[label == 2])
        assert blood > 2 * myocardium, patient.patient_id
        assert np.median(image[:, :, :5]) < myocardium  # the image border: air or lungs or muscle


def test_heart_box_does_not_clip_the_heart(monkeypatch, patients):
    """The heart is drawn inside a box per slice; drawing it on the whole image gives the same labels."""
    def whole(anatomy, s, cx, cy):
        return slice(0, anatomy.rows), slice(0, anatomy.cols)
    monkeypatch.setattr(synthetic, "_heart_box", whole)
    for index in (3, 5):  # the largest LV and the largest RV
        full = synthesize_patient(index, seed=0)
        np.testing.assert_array_equal(full.ed_label, patients[index].ed_label)
        np.testing.assert_array_equal(full.es_label, patients[index].es_label)


# --- writing the ACDC layout --------------------------------------------------------------------------------
def test_written_set_reads_back_with_the_acdc_loader(tmp_path, cached_writer):
    out = tmp_path / "synthetic"
    folders = write_synthetic_acdc(out, patients=2, seed=0)
    assert [f.name for f in folders] == ["patient001", "patient002"]
    assert (out / "README.txt").read_text().startswith("kpssl synthetic")
    cases = acdc_cases(out)
    assert [c.case_id for c in cases] == ["patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES"]
    for index in (1, 2):
        patient = _cached(index)
        info = read_info_cfg(out / "training" / patient.patient_id / "Info.cfg")
        assert set(info) == {"ED", "ES", "Group", "Height", "Weight", "NbFrame"}
        assert info == patient.info()
        for case in cases[2 * (index - 1):2 * index]:
            image = read_volume(case.image)
            label = read_volume(case.label, label=True)
            expected_image, expected_label = (
                (patient.ed_image, patient.ed_label) if case.phase == "ED" else (patient.es_image, patient.es_label))
            np.testing.assert_array_equal(image.array, expected_image)
            np.testing.assert_array_equal(label.array, expected_label)
            assert image.spacing == pytest.approx(patient.spacing)
            assert label.spacing == pytest.approx(patient.spacing)
    names = sorted(p.name for p in (out / "training" / "patient001").iterdir())
    patient = _cached(1)
    assert names == sorted(["Info.cfg", "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz",
                            f"patient001_frame{patient.es_frame:02d}.nii.gz",
                            f"patient001_frame{patient.es_frame:02d}_gt.nii.gz"])
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary files left behind


def test_rewriting_overwrites_and_removes_stale_patients(tmp_path, cached_writer):
    out = tmp_path / "synthetic"
    write_synthetic_acdc(out, patients=3, seed=0)
    write_synthetic_acdc(out, patients=2, seed=1)
    assert sorted(p.name for p in (out / "training").iterdir()) == ["patient001", "patient002"]
    assert "seed=1" in (out / "README.txt").read_text()
    np.testing.assert_array_equal(read_volume(out / "training" / "patient001" / "patient001_frame01_gt.nii.gz",
                                              label=True).array, _cached(1, seed=1).ed_label)
    for folder in (out / "training").iterdir():  # only this seed's ED and ES frames remain
        assert len(list(folder.glob("*.nii.gz"))) == 4
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_refuses_a_folder_that_is_not_a_synthetic_set(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my real data")
    with pytest.raises(DataError, match="not a kpssl synthetic"):
        write_synthetic_acdc(out, patients=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(DataError, match="not a folder"):
        write_synthetic_acdc(out / "notes.txt", patients=1)
    with pytest.raises(ValueError, match="patients"):
        write_synthetic_acdc(tmp_path / "new", patients=0)


def test_writes_into_an_empty_folder_and_reports_progress(tmp_path, capsys, cached_writer):
    out = tmp_path / "empty"
    out.mkdir()
    write_synthetic_acdc(out, patients=1, progress=True)
    assert "patient001" in capsys.readouterr().err
    assert (out / "training" / "patient001" / "Info.cfg").is_file()
