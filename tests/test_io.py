"""Reading and validating scans: real NIfTI and DICOM, and every kind of bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from models.io import InputError, case_name, read_image


def _write(tmp_path, array, name="x.nii.gz", spacing=None):
    img = sitk.GetImageFromArray(array)
    if spacing:
        img.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return path


def test_reads_real_nifti_with_oblique_header(data_dir):
    path = data_dir / "cardiac/mscmr_lge/images/subject1_lge.nii.gz"
    img = read_image(path)
    assert img.GetDimension() == 3
    assert not np.allclose(np.reshape(img.GetDirection(), (3, 3)), np.eye(3))
    assert case_name(path) == "subject1_lge"


def test_dicom_series_assembled_in_slice_order(data_dir):
    folder = data_dir / "dicom/prostate3t_t2/Prostate3T-03-0001"
    img = read_image(folder)
    files = sorted(folder.iterdir())
    assert img.GetSize()[2] == len(files)
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = np.cross(*np.reshape(np.array(dss[0].ImageOrientationPatient, float), (2, 3)))
    positions = sorted(float(np.dot(normal, d.ImagePositionPatient)) for d in dss)
    assert img.GetSpacing()[0] == pytest.approx(float(dss[0].PixelSpacing[1]), abs=1e-4)
    assert img.GetSpacing()[2] == pytest.approx(np.median(np.diff(positions)), abs=1e-3)
    # first voxel sits at the lowest position along the slice normal
    assert float(np.dot(normal, img.GetOrigin())) == pytest.approx(positions[0], abs=1e-3)
    assert case_name(folder) == "Prostate3T-03-0001"


def test_shuffled_dicom_file_list_gives_the_same_volume(data_dir, tmp_path):
    folder = data_dir / "dicom/prostate3t_t2/Prostate3T-03-0002"
    files = sorted(folder.iterdir())
    rng = np.random.default_rng(0)
    shuffled = [files[i] for i in rng.permutation(len(files))]
    a, b = read_image(folder), read_image(shuffled)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetOrigin() == b.GetOrigin()


def test_two_series_in_one_folder_must_be_chosen(data_dir, tmp_path):
    for name in ("Prostate3T-03-0001", "Prostate3T-03-0002"):
        for f in (data_dir / "dicom/prostate3t_t2" / name).iterdir():
            shutil.copy(f, tmp_path / f"{name}-{f.name}")
    with pytest.raises(InputError, match="several DICOM series"):
        read_image(tmp_path)
    uid = pydicom.dcmread(
        next(tmp_path.glob("Prostate3T-03-0002-*")), stop_before_pixels=True
    ).SeriesInstanceUID
    assert read_image(tmp_path, series_uid=uid).GetSize()[2] == len(
        list(tmp_path.glob("Prostate3T-03-0002-*"))
    )


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.random.rand(32, 32).astype(np.float32), "3D volume"),
        (np.full((8, 16, 16), 3.0, np.float32), "constant"),
        (np.where(np.random.rand(8, 16, 16) > 0.5, np.nan, 1.0).astype(np.float32), "NaN"),
        (np.where(np.random.rand(8, 16, 16) > 0.5, np.inf, 1.0).astype(np.float32), "NaN or infinite"),
        (np.random.rand(1, 16, 16).astype(np.float32), "not a 3D volume"),
    ],
)
def test_bad_volumes_rejected_with_reason(tmp_path, array, message):
    with pytest.raises(InputError, match=message):
        read_image(_write(tmp_path, array))


def test_4d_needs_a_frame(tmp_path):
    vol = np.random.rand(3, 6, 16, 16).astype(np.float32)
    path = tmp_path / "cine.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vol, isVector=False), str(path))
    with pytest.raises(InputError, match="4D image"):
        read_image(path)
    assert read_image(path, frame=2).GetSize() == (16, 16, 6)
    with pytest.raises(InputError, match="out of range"):
        read_image(path, frame=5)


def test_truncated_and_garbage_files(tmp_path, data_dir):
    src = (data_dir / "cardiac/mscmr_lge/images/subject1_lge.nii.gz").read_bytes()
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(src[: len(src) // 3])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_image(truncated)
    garbage = tmp_path / "noise.nii"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError):
        read_image(garbage)
    not_dicom = tmp_path / "notes"
    not_dicom.mkdir()
    (not_dicom / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image"):
        read_image(not_dicom)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_absurd_size_and_spacing(tmp_path):
    img = sitk.Image(4096, 4, 4, sitk.sitkUInt8)
    sitk.WriteImage(img, str(tmp_path / "wide.nii.gz"))
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "wide.nii.gz")
    with pytest.raises(InputError, match="spacing"):
        read_image(_write(tmp_path, np.random.rand(4, 8, 8).astype(np.float32), spacing=(1.0, 1.0, 500.0)))
