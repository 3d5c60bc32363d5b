"""Volumes keep their exact geometry through reading and writing, in every format; bad files are refused clearly."""

import gzip
import locale

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_file
from entropymerge.errors import UserInputError
from entropymerge.volume import Geometry, read_label_map, read_volume, write_volume

REAL_VOLUMES = [
    ("abdomen_totalseg_ct_mr/example_ct_sm.nii.gz", "RAS", (122, 101, 30)),
    ("abdomen_totalseg_ct_mr/example_mr_sm.nii.gz", "LPS", (117, 91, 20)),
    ("tiny_monai_testing_data/anatomical.nii", "LAS", (33, 41, 25)),
    ("spleen_msd_ct_ivadomed/sub-spleen2_ct.nii.gz", "RAS", (164, 166, 26)),
]


def oblique_geometry(shape=(20, 16, 12)) -> Geometry:
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flip = np.diag([-1.0, 1.0, -1.0])  # mirrored axes, as in LAS-like storage
    direction = rotation @ flip
    return Geometry(shape, (0.7, 1.3, 3.1), (-12.5, 40.25, 7.0), tuple(tuple(r) for r in direction))


@pytest.mark.parametrize("relative,orientation,shape", REAL_VOLUMES)
def test_real_volumes_keep_nibabel_affine_and_voxels(relative, orientation, shape):
    path = shared_file(relative)
    volume = read_volume(path)
    reference = nibabel.load(str(path))
    assert volume.geometry.shape == shape
    assert volume.geometry.orientation == orientation
    np.testing.assert_allclose(volume.geometry.affine_ras, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, np.asanyarray(reference.dataobj))


def test_big_endian_int16_reads_as_native_values():
    path = shared_file("tiny_monai_testing_data/anatomical.nii")
    assert nibabel.load(str(path)).get_data_dtype().byteorder == ">"
    volume = read_volume(path)
    assert volume.array.dtype.isnative and volume.array.dtype.kind == "i"
    assert volume.array.max() > 100  # byte-swapped values would be scrambled


@pytest.mark.parametrize("suffix", ["nii.gz", "nii", "nrrd", "mha", "mhd"])
def test_write_then_read_keeps_oblique_geometry(tmp_path, suffix):
    geometry = oblique_geometry()
    array = np.random.default_rng(0).normal(size=geometry.shape).astype(np.float32)
    path = write_volume(array, geometry, tmp_path / f"volume.{suffix}")
    volume = read_volume(path)
    assert volume.geometry.matches(geometry, tolerance_mm=1e-4)
    np.testing.assert_allclose(volume.geometry.direction, geometry.direction, atol=1e-6)
    np.testing.assert_array_equal(volume.array, array)
    assert not list(tmp_path.glob(".*partial*")), "temporary files must be renamed away"


def test_write_to_nifti_has_same_affine_in_nibabel(tmp_path):
    path = shared_file("abdomen_totalseg_ct_mr/example_mr_sm.nii.gz")
    volume = read_volume(path)
    out = write_volume((volume.array > 100).astype(np.uint8), volume.geometry, tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nibabel.load(str(out)).affine, nibabel.load(str(path)).affine, atol=1e-5)


def test_dicom_series_folder(tmp_path):
    geometry = Geometry((24, 20, 6), (0.8, 0.8, 2.5), (-10.0, 5.0, 30.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    array = (np.arange(np.prod(geometry.shape)).reshape(geometry.shape) % 1000).astype(np.int16)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    folder = tmp_path / "series"
    folder.mkdir()
    locale_before = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer sets the process's locale to "C"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(geometry.shape[2]):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",  # series instance UID
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.4f}" for p in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.8",
            "0018|0050": "2.5",
            "0008|0060": "CT",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    locale.setlocale(locale.LC_ALL, locale_before)
    volume = read_volume(folder)
    assert volume.geometry.matches(geometry, tolerance_mm=1e-3)
    np.testing.assert_array_equal(volume.array, array)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match="volume not found: .*nothing.nii.gz"):
        read_volume(tmp_path / "nothing.nii.gz")


def test_truncated_nifti_is_refused(tmp_path):
    path = shared_file("abdomen_totalseg_ct_mr/example_ct_sm.nii.gz")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated or corrupt"):
        read_volume(truncated)
    raw = tmp_path / "truncated.nii"
    raw.write_bytes(gzip.decompress(data)[:200_000])
    with pytest.raises(UserInputError, match="truncated or corrupt: Expected 739320 bytes, got 199648 bytes"):
        read_volume(raw)


def test_corrupt_and_wrong_type_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image" * 50)
    with pytest.raises(UserInputError, match="not a NIfTI file|not a valid NIfTI"):
        read_volume(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(UserInputError, match="unsupported file type"):
        read_volume(text)


def test_2d_and_4d_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(UserInputError, match="is 2D .* a 3D volume is needed"):
        read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(tmp_path / "time.nii.gz"))
    with pytest.raises(UserInputError, match="is 4D .* a 3D volume is needed"):
        read_volume(tmp_path / "time.nii.gz")
    sitk.WriteImage(sitk.Image([8, 8, 8, 1], sitk.sitkFloat32), str(tmp_path / "one_timepoint.nii.gz"))
    assert read_volume(tmp_path / "one_timepoint.nii.gz").geometry.shape == (8, 8, 8)


def test_nan_voxels_are_refused(tmp_path):
    geometry = oblique_geometry((6, 6, 6))
    array = np.zeros(geometry.shape, np.float32)
    array[2, 2, 2] = np.nan
    write_volume(array, geometry, tmp_path / "nan.nii.gz")
    with pytest.raises(UserInputError, match="NaN or infinite"):
        read_volume(tmp_path / "nan.nii.gz")


def test_label_map_on_another_grid_names_both_geometries(tmp_path):
    geometry = oblique_geometry((10, 10, 10))
    other = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    path = write_volume(np.zeros(other.shape, np.uint8), other, tmp_path / "labels.nii.gz")
    with pytest.raises(UserInputError) as error:
        read_label_map(path, geometry)
    message = str(error.value)
    assert "not on the target volume's grid" in message
    assert other.describe() in message and geometry.describe() in message


def test_geometry_orientation_codes():
    # i mirrored to -x (LPS) is Right, j along +y is Posterior, k mirrored to -z is Inferior; 17 degrees keep them closest
    assert oblique_geometry().orientation == "RPI"
    identity = Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    assert identity.orientation == "LPS"
    flipped = Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
    assert flipped.orientation == "RAS"
