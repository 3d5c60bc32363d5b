"""A reference segmentation or scribbles from the scene as the engine reads them: a label map on the target
volume's grid, segments mapped to label values by name, other grids and transforms resampled (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML scene")
import vtk  # noqa: E402

from entropymerge.volume import read_volume  # noqa: E402
from slicer_scene import LABEL_VALUES, new_scene, oblique_lps_matrix, phantom, segmentation_from_labels, translation_transform, volume_node  # noqa: E402
from slicer_scene import converters as converters  # noqa: E402 (a fixture: the alias marks it as used)
from SlicerEntropyMergeLib import scene as lib_scene  # noqa: E402


@pytest.fixture
def volume_scene(tmp_path, converters):
    """A scene with the phantom volume named "case" on an oblique LPS grid, its reference labels and a folder."""
    scene = new_scene()
    image, reference_labels = phantom()
    volume = volume_node(scene, image, oblique_lps_matrix())
    return {"scene": scene, "volume": volume, "reference_labels": reference_labels, "folder": tmp_path}


def test_reference_segment_named_after_no_label_is_refused(volume_scene):
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    wrong = segmentation_from_labels(scene, volume_scene["reference_labels"], volume, {1: "liver", 2: "structure 2"}, "wrong")
    with pytest.raises(ValueError, match="segment 'liver' of wrong is none of the models' labels"):
        lib_scene.write_label_map(scene, wrong, volume, volume_scene["folder"] / "wrong.nrrd", LABEL_VALUES)



def test_scribbles_leave_unpainted_voxels_unlabelled(volume_scene):
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    painted = np.zeros_like(volume_scene["reference_labels"])
    painted[7, 11, 13] = 2
    painted[0, 0, 0] = 1
    scribbles = segmentation_from_labels(scene, painted, volume, {1: "background", 2: "structure 2"}, "scribbles")
    path = lib_scene.write_label_map(scene, scribbles, volume, volume_scene["folder"] / "scribbles.nrrd", LABEL_VALUES, scribbles=True)
    written = read_volume(path).array.transpose(2, 1, 0)
    assert written[7, 11, 13] == 2 and written[0, 0, 0] == 0
    assert (written == lib_scene.UNLABELLED).sum() == written.size - 2



def test_scribbles_from_a_label_map_keep_unpainted_voxels_unlabelled(volume_scene):
    # Finding 5: Slicer's unpainted label-map voxels are 0; the engine's "unlabelled" is 255.
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    painted = np.zeros_like(volume_scene["reference_labels"])
    painted[7, 11, 13], painted[3, 4, 5] = 2, 1
    scribbles = volume_node(scene, painted, oblique_lps_matrix(), "painted", "vtkMRMLLabelMapVolumeNode")
    path = lib_scene.write_label_map(scene, scribbles, volume, volume_scene["folder"] / "painted.nrrd", LABEL_VALUES, scribbles=True)
    written = read_volume(path).array.transpose(2, 1, 0)
    assert written[7, 11, 13] == 2 and written[3, 4, 5] == 1
    assert (written == lib_scene.UNLABELLED).sum() == written.size - 2



def test_a_reference_label_map_on_another_grid_is_resampled_to_the_volume_grid(volume_scene):
    # Finding 8: a reference on a finer grid (half the voxel size, shifted by half a voxel of it) is taken, not refused.
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    volume_matrix = oblique_lps_matrix()
    fine_matrix = volume_matrix.copy()
    fine_matrix[:3, :3] = volume_matrix[:3, :3] / 2
    fine_matrix[:3, 3] = volume_matrix[:3, 3] - volume_matrix[:3, :3] @ np.array([0.25, 0.25, 0.25])
    fine = np.repeat(np.repeat(np.repeat(volume_scene["reference_labels"], 2, axis=0), 2, axis=1), 2, axis=2)
    reference = volume_node(scene, fine, fine_matrix, "fine reference", "vtkMRMLLabelMapVolumeNode")
    path = lib_scene.write_label_map(scene, reference, volume, volume_scene["folder"] / "fine.nrrd", LABEL_VALUES)
    written = read_volume(path)
    np.testing.assert_allclose(written.geometry.affine_ras, volume_matrix, atol=1e-6)
    np.testing.assert_array_equal(written.array.transpose(2, 1, 0), volume_scene["reference_labels"])



def test_a_reference_label_map_in_another_transform_is_resampled_through_it(volume_scene):
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    shifted_matrix = oblique_lps_matrix()
    shifted_matrix[:3, 3] -= (0.0, 0.0, 2 * 2.5)  # two slices lower ...
    reference = volume_node(scene, volume_scene["reference_labels"], shifted_matrix, "shifted reference", "vtkMRMLLabelMapVolumeNode")
    reference.SetAndObserveTransformNodeID(translation_transform(scene, (0.0, 0.0, 2 * 2.5)).GetID())  # ... moved back up
    written = read_volume(lib_scene.write_label_map(scene, reference, volume, volume_scene["folder"] / "moved.nrrd", LABEL_VALUES))
    np.testing.assert_array_equal(written.array.transpose(2, 1, 0), volume_scene["reference_labels"])



def test_a_reference_label_map_behind_a_non_linear_transform_is_refused_with_the_way_out(volume_scene):
    scene, volume = volume_scene["scene"], volume_scene["volume"]
    reference = volume_node(scene, volume_scene["reference_labels"], oblique_lps_matrix(), "warped reference", "vtkMRMLLabelMapVolumeNode")
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in ((0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50)):
        source.InsertNextPoint(point)
        target.InsertNextPoint(point[0] + 1.0, point[1], point[2])
    target.SetPoint(1, 53.0, 2.0, 0.0)
    warp = vtk.vtkThinPlateSplineTransform()
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform.SetAndObserveTransformToParent(warp)
    reference.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="warped reference and case are related by a non-linear transform; harden it"):
        lib_scene.write_label_map(scene, reference, volume, volume_scene["folder"] / "warped.nrrd", LABEL_VALUES)
