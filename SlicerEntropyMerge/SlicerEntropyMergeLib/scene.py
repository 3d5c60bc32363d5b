"""Volumes and label maps of the scene out to files, and back: what the engine reads.

Every function takes the scene (or nodes of it) as a parameter and uses no Qt, so it runs on a
plain ``vtkMRMLScene``. Files are written and read with Slicer's own volume storage node, which
keeps the IJK-to-RAS geometry exactly. The engine's outputs come back as nodes in ``results``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from entropymerge.settings import RankingSettings

from . import tr as _

ROLE = "EntropyMerge.Role"
SOURCE = "EntropyMerge.Volume"
CASE = "EntropyMerge.Case"  # on a volume loaded from a case file: the file's resolved path
UNLABELLED = RankingSettings.unlabelled_value  # the engine's default --unlabelled-value for scribbles


def write_volume_node(node, path: str | Path) -> Path:
    """Write a volume or label map node to ``path`` (format from the suffix, e.g. ``.nrrd``) with its geometry."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {node.GetName()} to {path}")
    return Path(path)


def read_volume_node(scene, path: str | Path, class_name: str, node=None):
    """Read a volume file into ``node`` (or a new node of ``class_name`` added to ``scene``)."""
    node = node or scene.AddNewNodeByClass(class_name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    return node


def label_map_on_grid(scene, segmentation, reference_volume, values: dict[str, int], background: int) -> np.ndarray:
    """A segmentation node as a (k, j, i) label array on the reference volume's grid.

    Each segment takes the value of the label it is named after (case is ignored); voxels in no
    segment get ``background``. Raises ``ValueError`` naming a segment that matches no label.
    """
    lookup = {name.lower(): value for name, value in values.items()}
    shape = reference_volume.GetImageData().GetDimensions()[::-1]
    labels = np.full(shape, background, dtype=np.uint8)
    contents = segmentation.GetSegmentation()
    mask_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        for index in range(contents.GetNumberOfSegments()):
            segment_id, name = contents.GetNthSegmentID(index), contents.GetNthSegment(index).GetName()
            if name.lower() not in lookup:
                raise ValueError(_("segment '{segment}' of {node} is none of the models' labels ({labels}); rename it "
                                   "after one of them").format(segment=name, node=segmentation.GetName(), labels=", ".join(values)))
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, mask_node, reference_volume)
            labels[slicer.util.arrayFromVolume(mask_node) > 0] = lookup[name.lower()]
    finally:
        scene.RemoveNode(mask_node)
    return labels


def resample_label_map(label_map, reference_volume, background: int = 0) -> np.ndarray:
    """A label map node's values as a (k, j, i) array on the reference volume's grid (nearest neighbour).

    Their (linear) transforms are taken into account; voxels outside the label map get ``background``.
    Raises ``ValueError`` when a non-linear transform lies between them.
    """
    shape = reference_volume.GetImageData().GetDimensions()[::-1]
    between = vtk.vtkMatrix4x4()  # reference volume's coordinates -> label map's coordinates
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(reference_volume.GetParentTransformNode(),
                                                                      label_map.GetParentTransformNode(), between):
        raise ValueError(_("{labels} and {volume} are related by a non-linear transform; harden it on {labels} first (Data "
                           "module: right-click, Harden transform)").format(labels=label_map.GetName(), volume=reference_volume.GetName()))
    reference_ijk_to_ras, label_ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(reference_ijk_to_ras)
    label_map.GetIJKToRASMatrix(label_ijk_to_ras)
    reference_to_label_ijk = (np.linalg.inv(slicer.util.arrayFromVTKMatrix(label_ijk_to_ras)) @ slicer.util.arrayFromVTKMatrix(between)
                              @ slicer.util.arrayFromVTKMatrix(reference_ijk_to_ras))
    values = slicer.util.arrayFromVolume(label_map)
    if values.shape == shape and np.allclose(reference_to_label_ijk, np.eye(4), atol=1e-6):
        return values.copy()  # already on the volume's grid
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(label_map.GetImageData())
    reslice.SetResliceAxes(slicer.util.vtkMatrixFromArray(reference_to_label_ijk))
    reslice.SetInterpolationModeToNearestNeighbor()
    reslice.SetBackgroundLevel(background)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reslice.Update()
    output = reslice.GetOutput()
    return numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(shape).copy()


def write_label_map(scene, node, reference_volume, path: str | Path, values: dict[str, int], scribbles: bool = False) -> Path:
    """Write a reference segmentation or scribbles (label map or segmentation node) on the volume's grid.

    A label map on another grid is resampled to the volume's (nearest neighbour). Segmentation
    segments are mapped to label values by name (see ``label_map_on_grid``). For scribbles, unpainted
    voxels get the engine's unlabelled value: in a label map these are Slicer's 0s (so painted
    background needs a segment named like the background label).
    """
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        labels = resample_label_map(node, reference_volume)
        if scribbles:
            labels = labels.astype(np.int32)
            labels[labels == 0] = UNLABELLED
    else:
        labels = label_map_on_grid(scene, node, reference_volume, values, UNLABELLED if scribbles else 0)
    carrier = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        carrier.CopyOrientation(reference_volume)
        slicer.util.updateVolumeFromArray(carrier, labels)
        return write_volume_node(carrier, path)
    finally:
        scene.RemoveNode(carrier)


def find_node(scene, class_name: str, attributes: dict[str, str]):
    """The first node of ``class_name`` that has all these attribute values, or None."""
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if all(node.GetAttribute(key) == value for key, value in attributes.items()):
            return node
    return None


def case_volume(scene, case: str | Path, load):
    """The volume node of a case file: the one loaded on an earlier visit, else ``load(case)`` marked as that case."""
    key = str(Path(case).resolve())
    existing = find_node(scene, "vtkMRMLScalarVolumeNode", {CASE: key})
    if existing is not None:
        return existing
    node = load(case)
    node.SetAttribute(CASE, key)
    return node
