"""Untrusted volumes and sizes (README "What is guaranteed"): a volume, a header or a window too large
for memory, a FIFO, values beyond float32, several components per voxel, a detached header that points elsewhere and
scribbles off the grid all exit 2 with one line, before any heavy work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import IDENTITY, one_line_error, run_cli
from entropymerge.errors import UserInputError
from entropymerge.volume import Geometry, write_volume

# -- 6. resource bombs are refused before anything large is allocated -------------------------------

@pytest.mark.parametrize("case, arguments", [
    ("huge window", ["--roi-size", "1000000", "1000000", "1000000"]),
    ("low limit", ["--memory-limit", "0.001"]),
])
def test_runs_too_large_for_memory_exit_2_with_the_numbers(tmp_path, volume, model_factory, case, arguments):
    result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none",
                     *arguments)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "error: this run would need about " in result.stderr and "raise it with --memory-limit GB" in result.stderr


def test_a_500_mm_voxel_or_a_0_01_mm_model_spacing_is_refused(tmp_path, model_factory):
    geometry = Geometry((20, 20, 20), (500.0, 500.0, 500.0), (0, 0, 0), IDENTITY)
    huge_voxels = write_volume(np.zeros(geometry.shape, np.float32), geometry, tmp_path / "huge-voxels.nii.gz")
    result = run_cli("run", "--volume", huge_voxels, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2 and "this run would need about" in result.stderr and "(this computer)" in result.stderr
    fine = model_factory("fine", spacing=(0.01, 0.01, 0.01), folder=tmp_path / "fine")
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    small = write_volume(np.zeros(geometry.shape, np.float32), geometry, tmp_path / "small.nii.gz")
    result = run_cli("run", "--volume", small, "--model", fine, "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2 and "model spacing 0.01x0.01x0.01 mm" in result.stderr


def test_a_small_file_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
    import nibabel

    from entropymerge.volume import read_volume

    header = nibabel.Nifti1Header()
    header.set_data_shape((20000, 20000, 20000))
    header.set_data_dtype(np.float32)
    path = tmp_path / "bomb.nii"
    with open(path, "wb") as stream:
        header.write_to(stream)
        stream.write(b"\0" * 64)
    with pytest.raises(UserInputError, match=r"has 8,000,000,000,000 voxels .* this computer has"):
        read_volume(path)


def test_a_fifo_as_the_volume_exits_2_without_hanging(tmp_path, model_factory):
    fifo = tmp_path / "volume.nii.gz"
    os.mkfifo(fifo)
    result = run_cli("run", "--volume", fifo, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: volume {fifo} is not a regular file"]


# -- 7, 8. every bad volume exits 2 with one line; nothing wrong is silently accepted -----------------

def test_scl_slope_beyond_float32_and_rgb_volumes_exit_2(tmp_path):
    import nibabel
    import SimpleITK as sitk

    from entropymerge.volume import read_volume

    image = nibabel.Nifti1Image(np.full((4, 4, 4), 10, np.int16), np.eye(4))
    image.header.set_slope_inter(1e38, 0)
    nibabel.save(image, tmp_path / "scaled.nii.gz")
    with pytest.raises(UserInputError, match="beyond the float32 range"):
        read_volume(tmp_path / "scaled.nii.gz")
    rgb = sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(UserInputError, match="has 3 components per voxel; a scalar volume is needed"):
        read_volume(tmp_path / "rgb.nrrd")


def test_a_detached_header_may_not_read_a_file_elsewhere(tmp_path):
    from entropymerge.volume import read_volume

    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "volumes"
    folder.mkdir()
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 16\nencoding: raw\ndata file: ../secret.raw\n\n"
    (folder / "scan.nhdr").write_text(header, encoding="utf-8")
    with pytest.raises(UserInputError, match="data file .*secret.raw lies outside"):
        read_volume(folder / "scan.nhdr")


# -- 9. early and quiet failures ---------------------------------------------------------------------

def test_bad_scribbles_are_refused_before_the_probe(tmp_path, volume, model_factory):
    geometry = Geometry((10, 10, 10), (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY)
    scribbles = write_volume(np.zeros(geometry.shape, np.uint8), geometry, tmp_path / "scribbles.nii.gz")
    result = run_cli("rank", "--volume", volume, "--model", model_factory("a", seed=1), "--model", model_factory("b", seed=2),
                     "--scribbles", scribbles, "--out", tmp_path / "out", "--progress", "json")
    assert "is not on the target volume's grid" in one_line_error(result)
    stages = [json.loads(record)["stage"] for record in result.stdout.splitlines() if '"progress"' in record]
    assert stages and set(stages) == {"load"}
