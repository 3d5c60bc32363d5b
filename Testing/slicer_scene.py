"""Shared by the tests of SlicerEntropyMergeLib on a real MRML scene (slicer-core): scenes, volume and
segmentation nodes on an oblique grid, small site models, and one real engine run through the Lib.

The test modules import the fixtures (``converters``, ``run``) from here as ``from slicer_scene import run as
run``: the redundant alias tells ruff the import is meant (a fixture is used only as an argument of that name).
"""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML scene")
import slicer.util  # noqa: E402, F811
import vtk  # noqa: E402

from conftest import make_card  # noqa: E402
from entropymerge.models import save_site_model  # noqa: E402
from entropymerge.safeconfig import build_network  # noqa: E402
from entropymerge.volume import read_volume  # noqa: E402
from SlicerEntropyMergeLib.engine import RunRequest  # noqa: E402
from SlicerEntropyMergeLib.job import finish_run, start_run  # noqa: E402
from SlicerEntropyMergeLib.process import SUCCEEDED  # noqa: E402

LABEL_NAMES = ["background", "structure 1", "structure 2"]
LABEL_VALUES = {name: value for value, name in enumerate(LABEL_NAMES)}


@functools.cache
def register_converters() -> None:
    """Register the segmentation converter rules that Slicer's Segmentations module registers at start-up (once)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())



@pytest.fixture(scope="module")
def converters():
    """The segmentation converter rules of a Slicer that has started."""
    register_converters()



def new_scene():
    """A plain MRML scene with the node classes Slicer's Colors module registers (colour legends)."""
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    return scene



def oblique_lps_matrix(spacing=(1.5, 1.2, 2.5), origin=(12.0, -30.0, 7.5), degrees=10.0) -> np.ndarray:
    """IJK-to-RAS of an LPS-stored, anisotropic grid, turned a little about the superior axis."""
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix



def volume_node(scene, array_kji: np.ndarray, matrix: np.ndarray, name: str = "case", class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, array_kji)
    return node



def node_matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)



def phantom(shape_kji=(14, 22, 26), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A blob with a brighter core in noise, and its two-class reference."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji)
    centre = np.array(shape_kji) / 2
    distance = np.sqrt(((k - centre[0]) / 5) ** 2 + ((j - centre[1]) / 7) ** 2 + ((i - centre[2]) / 8) ** 2)
    labels = np.where(distance < 0.5, 2, np.where(distance < 1.0, 1, 0)).astype(np.uint8)
    image = (labels.astype(np.float64) * 300 + rng.normal(0, 20, shape_kji)).astype(np.int16)
    return image, labels



def in_study(scene, node) -> int:
    """Put ``node`` in a patient / study of the subject hierarchy, as DICOM loading does; returns the study."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, node)
    return study



def segmentation_from_labels(scene, labels_kji: np.ndarray, reference, names: dict[int, str], name="reference"):
    """A segmentation node with one named segment per value of ``labels_kji``."""
    carrier = volume_node(scene, labels_kji, node_matrix(reference), "carrier", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    ids = vtk.vtkStringArray()
    for value in range(1, max(names) + 1):
        ids.InsertNextValue(segmentation.GetSegmentation().AddEmptySegment(names[value], names[value], (1.0, 0.0, 0.0)))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(carrier, segmentation, ids)
    scene.RemoveNode(carrier)
    return segmentation



def segmentation_labels(scene, segmentation, reference) -> np.ndarray:
    """The segmentation exported back to a label map on the reference volume's grid, (k, j, i)."""
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, out, reference)
    array = slicer.util.arrayFromVolume(out).copy()
    scene.RemoveNode(out)
    return array



def save_models(folder: Path) -> list[Path]:
    paths = []
    for seed, name in enumerate(("north", "south")):
        card = make_card(name, classes=3, roi=(32, 32, 32))
        torch.manual_seed(seed)
        paths.append(save_site_model(build_network(card.network, "test"), card, folder, name))
    return paths



def translation_transform(scene, offset_mm=(14.0, 0.0, 0.0)):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = np.eye(4)
    matrix[:3, 3] = offset_mm
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return transform



@pytest.fixture(scope="module")
def run(tmp_path_factory, converters):
    """One real engine run on an exported volume node: adaptive merge, per-model outputs, ranking, reference."""
    folder = tmp_path_factory.mktemp("slicer-run")
    scene = new_scene()
    image, reference_labels = phantom()
    volume = volume_node(scene, image, oblique_lps_matrix())
    study = in_study(scene, volume)
    reference = segmentation_from_labels(scene, reference_labels, volume, {1: "Structure 1", 2: "structure 2"})
    request = RunRequest(models=[str(p) for p in save_models(folder / "models")], device="cpu", per_model=True, rank=True)
    job = start_run(scene, volume, request, labels=reference, label_values=LABEL_VALUES, work_root=str(folder))
    events = job.process.wait(600)
    assert job.process.state == SUCCEEDED, job.process.error
    # what the engine was given, kept before finish_run removes the work folder
    inputs = {name: read_volume(job.work / name) for name in ("volume.nrrd", "labels.nrrd")}
    out = folder / "out"
    shutil.copytree(job.out, out)
    results = finish_run(scene, job)
    return {"scene": scene, "volume": volume, "study": study, "folder": folder, "events": events, "inputs": inputs,
            "image": image, "reference_labels": reference_labels, "out": out, "job": job, "models": request.models,
            "results": results}
