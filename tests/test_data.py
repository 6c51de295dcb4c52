"""NIfTI I/O, layouts, preprocessing, slices, splits and the folder check, including bad inputs."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from kpssl.cli import main
from kpssl.data import (
    DataError, LabelledSlices, acdc_cases, center_pad_crop, decathlon_cases, fold_split, labelled_subset,
    load_volumes, patient_folds, read_volume, resample_inplane, slice_partition, slice_position, write_volume,
    zscore,
)
from kpssl.data.check import check_folder
from kpssl.settings import DataSettings, SplitSettings


# --- NIfTI -----------------------------------------------------------------------------------------
def test_volume_round_trip_keeps_spacing_and_orientation(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 7, 9)).astype(np.float32)
    affine = np.array([[0, -1.5, 0, 10], [1.2, 0, 0, -4], [0, 0, 8, 2], [0, 0, 0, 1]], float)
    path = write_volume(tmp_path / "v.nii.gz", array, (8.0, 1.2, 1.5), affine)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((8.0, 1.2, 1.5))
    np.testing.assert_allclose(volume.affine, affine)
    assert nib.load(str(path)).shape == (7, 9, 5)  # NIfTI keeps slices on its last axis
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_labels_round_trip_as_integers(tmp_path):
    label = np.random.default_rng(1).integers(0, 4, (3, 4, 5))
    volume = read_volume(write_volume(tmp_path / "l.nii.gz", label, (10, 1, 1), label=True), label=True)
    np.testing.assert_array_equal(volume.array, label)
    assert np.issubdtype(volume.array.dtype, np.integer)


def test_missing_truncated_and_non_nifti_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    good = write_volume(tmp_path / "good.nii.gz", np.ones((4, 8, 8), np.float32) * 3.5, (1, 1, 1))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: not a readable NIfTI"):
        read_volume(truncated)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a NIfTI header at all" * 20))
    with pytest.raises(DataError, match=r"fake\.nii\.gz: not a readable NIfTI"):
        read_volume(fake)
    text = tmp_path / "text.nii.gz"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"text\.nii\.gz"):
        read_volume(text)


def test_wrong_dimensionality_and_non_integer_labels(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="expected a 3D volume"):
        read_volume(path)
    path = tmp_path / "frac.nii.gz"
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), 0.5, np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="non-integer"):
        read_volume(path, label=True)


# --- layouts ---------------------------------------------------------------------------------------
def test_acdc_cases(tiny_acdc):
    cases = acdc_cases(tiny_acdc)
    assert [c.case_id for c in cases] == [f"patient00{p}_{ph}" for p in (1, 2, 3) for ph in ("ED", "ES")]
    assert cases[0].image.name == "patient001_frame01.nii.gz" and cases[1].label.name == "patient001_frame09_gt.nii.gz"
    assert {c.patient for c in cases} == {"patient001", "patient002", "patient003"}


def test_acdc_ignores_the_4d_file_and_reads_testing(tiny_acdc):
    (tiny_acdc / "testing").mkdir()
    shutil.move(str(tiny_acdc / "training" / "patient003"), str(tiny_acdc / "testing" / "patient003"))
    (tiny_acdc / "training" / "patient001" / "patient001_4d.nii.gz").write_bytes(b"ignored")
    assert len(acdc_cases(tiny_acdc)) == 6


def test_info_cfg_without_es(tiny_acdc):
    (tiny_acdc / "training" / "patient002" / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    with pytest.raises(DataError, match=r"patient002/Info.cfg: missing ES"):
        acdc_cases(tiny_acdc)


def test_decathlon_cases(tiny_decathlon):
    cases = decathlon_cases(tiny_decathlon)
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert cases[0].labels == {0: "background", 1: "a", 2: "b", 3: "c"}


# --- preprocessing ---------------------------------------------------------------------------------
def test_resample_inplane_sizes_and_spacing():
    image = np.random.default_rng(0).normal(size=(3, 80, 60)).astype(np.float32)
    out, spacing = resample_inplane(image, (10.0, 1.5, 2.0), (1.25, 1.25))
    assert out.shape == (3, 96, 96) and spacing == pytest.approx((10.0, 1.25, 1.25))
    label = np.zeros((1, 10, 10), np.int16)
    label[0, 2:8, 2:8] = 3
    out, _ = resample_inplane(label, (1, 2.0, 2.0), (1.0, 1.0), label=True)
    assert set(np.unique(out)) == {0, 3} and out.shape == (1, 20, 20) and (out == 3).sum() == 144


def test_resample_preserves_a_linear_ramp():
    ramp = np.tile(np.arange(40, dtype=np.float32), (1, 40, 1))  # value = column
    out, _ = resample_inplane(ramp, (1, 1.0, 1.0), (0.5, 0.5))
    # pixel edges aligned (grid mode): new column c has its centre at old column (c + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[0, 40, 20:60], np.arange(20, 60) / 2 - 0.25, atol=1e-4)


def test_zscore_and_pad_crop():
    z = zscore(np.arange(10, dtype=np.float32))
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    assert np.all(zscore(np.ones(5)) == 0)
    out, offset = center_pad_crop(np.arange(12).reshape(3, 4), 6, fill=-1)
    assert out.shape == (6, 6) and offset == (1, 1) and out[1, 1] == 0 and out[0, 0] == -1
    out, offset = center_pad_crop(np.arange(100).reshape(10, 10), 4)
    assert out[0, 0] == 33 and offset == (-3, -3)


# --- slices and splits -----------------------------------------------------------------------------
def test_slice_position_and_partition():
    assert slice_position(0, 10) == pytest.approx(0.1) and slice_position(9, 10) == pytest.approx(1.0)
    assert [slice_partition(i, 10) for i in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert slice_partition(0, 1) == 0
    np.testing.assert_array_equal(slice_partition(np.arange(8), 8), [0, 0, 1, 1, 2, 2, 3, 3])


def test_labelled_slices(tiny_acdc):
    settings = DataSettings(spacing_mm=(1.0, 1.0), patch=48)
    volumes = load_volumes(tiny_acdc, settings)
    assert volumes[0].image.shape == (6, 60, 60) and volumes[0].spacing == pytest.approx((10, 1, 1))
    assert abs(volumes[0].image.mean()) < 1e-5
    dataset = LabelledSlices(volumes, settings)
    assert len(dataset) == 36
    item = dataset[7]
    assert item["image"].shape == (1, 48, 48) and item["label"].shape == (48, 48)
    assert int(item["volume"]) == 1 and int(item["slice"]) == 1
    assert float(item["position"]) == pytest.approx(2 / 6) and int(item["partition"]) == 0


def test_load_volumes_rejects_mismatched_shapes(tiny_acdc):
    label = tiny_acdc / "training" / "patient002" / "patient002_frame09_gt.nii.gz"
    write_volume(label, np.zeros((6, 40, 38)), (10.0, 1.5, 1.5), label=True)
    with pytest.raises(DataError, match=r"patient002_frame09_gt\.nii\.gz: label shape"):
        load_volumes(tiny_acdc, DataSettings())


# The authors' folds and labelled patients, computed once with scikit-learn 1.9.1 and Python 3.11:
#   keys = [f"patient{i:03d}" for i in range(1, 101)]
#   for fold, (train, test) in enumerate(KFold(n_splits=5, shuffle=True, random_state=12345).split(keys)):
#       test fold = keys[test]; train_keys = list(np.array(keys)[train])
#       random.seed(1234); random.sample(train_keys, M)   for M = 2 and 6
# and for CHD-like names without zero padding, keys = [f"case{n}" for n in range(1, 69)] (numeric order).
ACDC_TEST_FOLDS = [
    [5, 10, 14, 21, 26, 29, 34, 36, 41, 43, 50, 52, 61, 64, 66, 70, 76, 79, 87, 89],
    [1, 3, 7, 9, 18, 27, 31, 38, 40, 46, 47, 48, 51, 53, 55, 58, 72, 77, 88, 93],
    [13, 17, 19, 20, 22, 23, 25, 28, 33, 49, 59, 63, 69, 75, 80, 84, 85, 86, 90, 96],
    [4, 6, 16, 24, 32, 45, 54, 56, 57, 62, 65, 67, 68, 71, 73, 91, 92, 94, 95, 97],
    [2, 8, 11, 12, 15, 30, 35, 37, 39, 42, 44, 60, 74, 78, 81, 82, 83, 98, 99, 100],
]
ACDC_LABELLED = {  # fold: {M: patients} drawn from the whole training fold
    0: {2: [18, 73], 6: [1, 6, 15, 18, 73, 95]},
    1: {2: [20, 74], 6: [2, 8, 16, 20, 74, 95]},
    2: {2: [16, 70], 6: [1, 5, 12, 16, 70, 94]},
    3: {2: [18, 70], 6: [1, 7, 14, 18, 70, 90]},
    4: {2: [20, 69], 6: [1, 6, 17, 20, 69, 92]},
}
CASE_TEST_FOLDS = [
    [5, 7, 23, 33, 36, 43, 44, 48, 49, 52, 53, 59, 61, 62],
    [3, 9, 13, 21, 22, 25, 26, 27, 29, 31, 41, 45, 46, 47],
    [1, 4, 6, 16, 20, 24, 32, 34, 54, 56, 57, 58, 60, 66],
    [8, 10, 11, 12, 14, 17, 18, 19, 28, 39, 40, 51, 65],
    [2, 15, 30, 35, 37, 38, 42, 50, 55, 63, 64, 67, 68],
]


def test_folds_are_the_authors_kfold():
    patients = [f"patient{i:03d}" for i in range(1, 101)]
    folds = patient_folds(patients, 5, 12345)
    assert folds == [tuple(f"patient{i:03d}" for i in fold) for fold in ACDC_TEST_FOLDS]
    assert folds == patient_folds(list(reversed(patients)), 5, 12345)  # input order does not matter
    cases = [f"case{n}" for n in range(68, 0, -1)]
    assert patient_folds(cases, 5, 12345) == [tuple(f"case{n}" for n in fold) for fold in CASE_TEST_FOLDS]


def test_labelled_patients_are_the_authors_draw():
    patients = [f"patient{i:03d}" for i in range(1, 101)]
    authors = SplitSettings(validation_fraction=0.0)  # the pool is the whole training fold
    for fold, draws in ACDC_LABELLED.items():
        split = fold_split(patients, fold, authors)
        assert split.validation == () and len(split.train) == 80
        for m, expected in draws.items():
            assert labelled_subset(split, m, 1234) == tuple(f"patient{i:03d}" for i in expected)


def test_folds_partition_patients_reproducibly():
    patients = [f"patient{i:03d}" for i in range(1, 23)]
    folds = patient_folds(patients, 5, 12345)
    assert sorted(sum(map(list, folds), [])) == patients
    assert [len(f) for f in folds] == [5, 5, 4, 4, 4]
    assert folds != patient_folds(patients, 5, 1)


def test_fold_split_and_nested_subsets():
    patients = [f"p{i:02d}" for i in range(20)]
    settings = SplitSettings()
    seen_test = []
    for fold in range(5):
        split = fold_split(patients, fold, settings)
        assert not set(split.train) & set(split.test) and not set(split.validation) & set(split.test)
        assert not set(split.train) & set(split.validation)
        assert len(split.train) + len(split.validation) + len(split.test) == 20
        seen_test += split.test
        # pools of at most 21 patients: Python's sample takes prefixes of one draw, so budgets nest
        small, large = labelled_subset(split, 2, 1234), labelled_subset(split, 6, 1234)
        assert set(small) <= set(large) <= set(split.train) and len(large) == 6
        assert small == labelled_subset(split, 2, 1234)
    assert sorted(seen_test) == patients
    with pytest.raises(ValueError, match="M = 99"):
        labelled_subset(fold_split(patients, 0, settings), 99, 1)
    with pytest.raises(ValueError, match="fold 7"):
        fold_split(patients, 7, settings)


# --- kpssl check -----------------------------------------------------------------------------------
def test_check_sound_folders(tiny_acdc, tiny_decathlon, capsys):
    assert check_folder(tiny_acdc).ok and check_folder(tiny_decathlon).ok
    assert main(["check", str(tiny_acdc)]) == 0
    assert "3 patients, 6 labelled volumes" in capsys.readouterr().out


def _problems(root, capsys):
    code = main(["check", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err
    return err


def test_check_missing_label(tiny_acdc, capsys):
    (tiny_acdc / "training" / "patient002" / "patient002_frame09_gt.nii.gz").unlink()
    assert _problems(tiny_acdc, capsys) == [
        f"{tiny_acdc}/training/patient002/patient002_frame09_gt.nii.gz: label file not found (ES frame 9 named in Info.cfg)"]


def test_check_truncated_image_and_bad_labels_report_every_problem(tiny_acdc, capsys):
    image = tiny_acdc / "training" / "patient001" / "patient001_frame01.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    label = tiny_acdc / "training" / "patient003" / "patient003_frame01_gt.nii.gz"
    write_volume(label, np.full((6, 40, 40), 7), (10.0, 1.5, 1.5), label=True)
    shape = tiny_acdc / "training" / "patient002" / "patient002_frame01_gt.nii.gz"
    write_volume(shape, np.zeros((5, 40, 40)), (10.0, 1.5, 1.5), label=True)
    problems = _problems(tiny_acdc, capsys)
    assert len(problems) == 3
    assert problems[0].startswith(f"{image}: not a readable NIfTI")
    assert problems[1].startswith(f"{shape}: label shape (5, 40, 40) differs from image shape (6, 40, 40)")
    assert problems[2] == f"{label}: label values [7] outside the allowed set [0, 1, 2, 3]"


def test_check_spacing_mismatch(tiny_acdc, capsys):
    label = tiny_acdc / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    write_volume(label, read_volume(label, label=True).array, (10.0, 2.0, 1.5), label=True)
    assert "label spacing" in _problems(tiny_acdc, capsys)[0]


def test_check_info_cfg_without_ed(tiny_acdc, capsys):
    cfg = tiny_acdc / "training" / "patient001" / "Info.cfg"
    cfg.write_text("ES: 9\nGroup: NOR\n")
    assert _problems(tiny_acdc, capsys) == [f"{cfg}: missing ED (the end-diastolic frame)"]


def test_check_frame_named_in_info_cfg_must_exist(tiny_acdc, capsys):
    cfg = tiny_acdc / "training" / "patient003" / "Info.cfg"
    cfg.write_text("ED: 1\nES: 12\n")
    problems = _problems(tiny_acdc, capsys)
    assert any("patient003_frame12.nii.gz: image not found (ES frame 12" in p for p in problems)


def test_check_empty_and_missing_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "neither an ACDC layout" in _problems(tmp_path / "empty", capsys)[0]
    assert "folder not found" in _problems(tmp_path / "absent", capsys)[0]


def test_check_decathlon_problems(tiny_decathlon, capsys):
    (tiny_decathlon / "labelsTr" / "case_001.nii.gz").unlink()
    meta = json.loads((tiny_decathlon / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "a", "2": "b"}
    (tiny_decathlon / "dataset.json").write_text(json.dumps(meta))
    problems = _problems(tiny_decathlon, capsys)
    assert any("case_001.nii.gz: file not found (listed in dataset.json)" in p for p in problems)
    assert any("label values [3] outside the allowed set [0, 1, 2]" in p for p in problems)
    (tiny_decathlon / "dataset.json").write_text("{not json")
    assert "dataset.json: not valid JSON" in _problems(tiny_decathlon, capsys)[0]


# --- bad data caught early -------------------------------------------------------------------------
def test_misnamed_patient_folders_are_reported_not_dropped(tiny_acdc, capsys):
    training = tiny_acdc / "training"
    (training / "patient002").rename(training / "patient02")
    shutil.copytree(training / "patient003", training / "Patient007")
    problems = _problems(tiny_acdc, capsys)
    assert problems == [
        f"{training / 'Patient007'}: misnamed patient folder: expected 'patientNNN' (lower case, three digits, "
        "e.g. patient007)",
        f"{training / 'patient02'}: misnamed patient folder: expected 'patientNNN' (lower case, three digits, "
        "e.g. patient002)",
    ]
    with pytest.raises(DataError, match=r"Patient007: misnamed patient folder"):
        acdc_cases(tiny_acdc)
    with pytest.raises(DataError, match=r"Patient007: misnamed patient folder"):
        load_volumes(tiny_acdc, DataSettings())


def test_only_misnamed_folders_still_count_as_the_acdc_layout(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "patient1").mkdir(parents=True)
    problems = _problems(root, capsys)
    assert problems == [f"{root / 'patient1'}: misnamed patient folder: expected 'patientNNN' (lower case, three "
                        "digits, e.g. patient001)"]


def test_same_patient_in_training_and_testing_is_refused_not_merged(tiny_acdc, capsys):
    (tiny_acdc / "testing").mkdir()
    shutil.copytree(tiny_acdc / "training" / "patient001", tiny_acdc / "testing" / "patient001")
    problems = _problems(tiny_acdc, capsys)
    assert problems == [f"{tiny_acdc / 'testing' / 'patient001'}: patient ID patient001 also at "
                        f"{tiny_acdc / 'training' / 'patient001'}: each patient must appear once (training/ and "
                        "testing/ must not share IDs)"]
    with pytest.raises(DataError, match=r"testing/patient001: patient ID patient001 also at"):
        acdc_cases(tiny_acdc)


def test_decathlon_case_listed_twice_is_refused(tiny_decathlon, capsys):
    meta = json.loads((tiny_decathlon / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][0]))
    (tiny_decathlon / "dataset.json").write_text(json.dumps(meta))
    assert any("case 'case_000' listed twice" in p for p in _problems(tiny_decathlon, capsys))
    with pytest.raises(DataError, match=r"dataset\.json: case 'case_000' listed twice"):
        decathlon_cases(tiny_decathlon)


def _overwrite_image(path, change):
    volume = read_volume(path)
    array = volume.array.copy()
    change(array)
    image = nib.Nifti1Image(np.transpose(array, (1, 2, 0)).astype(np.float32), volume.affine)
    image.header.set_zooms((volume.spacing[1], volume.spacing[2], volume.spacing[0]))
    nib.save(image, str(path))  # float32 as stored, so 3e38 survives


def test_one_absurd_voxel_is_refused_by_check_and_loaders(tiny_acdc, capsys):
    image = tiny_acdc / "training" / "patient002" / "patient002_frame01.nii.gz"
    _overwrite_image(image, lambda a: a.__setitem__((2, 5, 5), 3e38))
    problems = _problems(tiny_acdc, capsys)
    assert problems == [f"{image}: absurd intensities: 1 voxel(s) reach 3e+38, beyond 1e+07 (a corrupted file?)"]
    with pytest.raises(DataError, match=r"patient002_frame01\.nii\.gz: absurd intensities"):
        load_volumes(tiny_acdc, DataSettings(), labels=False)


def test_non_finite_voxel_is_reported_by_check(tiny_acdc, capsys):
    image = tiny_acdc / "training" / "patient003" / "patient003_frame09.nii.gz"
    _overwrite_image(image, lambda a: a.__setitem__((0, 1, 1), np.nan))
    assert _problems(tiny_acdc, capsys) == [f"{image}: image holds non-finite values (NaN or infinity) in 1 voxel(s)"]


def test_constant_image_is_refused_not_normalised_to_zeros(tiny_acdc, capsys):
    image = tiny_acdc / "training" / "patient001" / "patient001_frame09.nii.gz"
    _overwrite_image(image, lambda a: a.fill(0.0))
    problems = _problems(tiny_acdc, capsys)
    assert problems == [f"{image}: image is constant (every voxel is 0): nothing to learn or segment"]
    with pytest.raises(DataError, match=r"patient001_frame09\.nii\.gz: image is constant"):
        load_volumes(tiny_acdc, DataSettings(), labels=False)


def test_zscore_computes_in_float64():
    rng = np.random.default_rng(3)
    array = rng.normal(1000, 50, (4, 16, 16)).astype(np.float32)
    array[1, 2, 3] = 3e38  # the float32 sum of this volume overflows
    reference = (array.astype(np.float64) - array.astype(np.float64).mean()) / array.astype(np.float64).std()
    out = zscore(array)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out.astype(np.float64), reference, rtol=1e-6, atol=1e-6)
    large = rng.normal(5e6, 1e3, (3, 8, 8)).astype(np.float32)  # float32 variance loses digits here
    reference = (large.astype(np.float64) - large.astype(np.float64).mean()) / large.astype(np.float64).std()
    np.testing.assert_allclose(zscore(large).astype(np.float64), reference, atol=1e-5)


def test_decathlon_layout_is_detected_by_default_settings(tiny_decathlon, tiny_acdc):
    assert DataSettings().layout == "auto"
    volumes = load_volumes(tiny_decathlon, DataSettings(spacing_mm=None, patch=48), labels=False)
    assert [v.case_id for v in volumes] == ["case_000", "case_001", "case_002"]
    with pytest.raises(DataError, match=r"dataset\.json: file not found"):
        load_volumes(tiny_acdc, DataSettings(layout="decathlon"))  # an explicit layout is obeyed


def test_a_file_given_as_the_data_folder_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "volume.nii.gz"
    path.write_text("x")
    assert _problems(path, capsys) == [f"{path}: a file, not a data folder"]
    with pytest.raises(DataError, match="a file, not a data folder"):
        acdc_cases(path)
