"""SlicerEntropyMergeLib on a real MRML scene (slicer-core): a volume node goes out to the real engine and
its results come back as nodes on the volume's exact grid, named, coloured and placed in the study."""

from __future__ import annotations

import json
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
from entropymerge.modelcard import DEFAULT_COLORS  # noqa: E402
from entropymerge.models import load_site_model, save_site_model  # noqa: E402
from entropymerge.safeconfig import build_network  # noqa: E402
from entropymerge.volume import read_volume  # noqa: E402
from SlicerEntropyMergeLib import results as lib_results  # noqa: E402
from SlicerEntropyMergeLib import scene as lib_scene  # noqa: E402
from SlicerEntropyMergeLib.engine import RunRequest, read_summary  # noqa: E402
from SlicerEntropyMergeLib.job import abandon_run, discard_model, finish_run, save_merged_model, start_run  # noqa: E402
from SlicerEntropyMergeLib.process import SUCCEEDED  # noqa: E402

LABEL_NAMES = ["background", "structure 1", "structure 2"]
LABEL_VALUES = {name: value for value, name in enumerate(LABEL_NAMES)}


@pytest.fixture(scope="module")
def converters():
    """The segmentation converter rules that Slicer's Segmentations module registers at start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


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


def test_exported_volume_keeps_geometry_and_voxels(run):
    engine_view = run["inputs"]["volume.nrrd"]
    np.testing.assert_allclose(engine_view.geometry.affine_ras, oblique_lps_matrix(), atol=1e-6)
    np.testing.assert_array_equal(engine_view.array, run["image"].transpose(2, 1, 0))
    assert engine_view.geometry.orientation == "LPS"


def test_reference_segments_are_written_by_name_on_the_volume_grid(run):
    written = run["inputs"]["labels.nrrd"]
    np.testing.assert_allclose(written.geometry.affine_ras, oblique_lps_matrix(), atol=1e-6)
    np.testing.assert_array_equal(written.array, run["reference_labels"].transpose(2, 1, 0))


def test_the_run_used_the_reference_and_cleaned_its_work_folder(run):
    summary = read_summary(run["out"])
    assert summary["evaluation"]["classes_in_reference"] == LABEL_NAMES[1:]
    assert summary["ranking"]["label_source"] == "reference"
    assert not run["job"].work.exists()


def test_progress_reaches_done_through_the_stages(run):
    progress = [e for e in run["events"] if e.kind == "progress"]
    assert [e.fraction for e in progress] == sorted(e.fraction for e in progress)
    assert {"load", "probe", "inference", "rank"} <= {e.stage for e in progress}
    done = [e for e in run["events"] if e.kind == "done"]
    assert len(done) == 1 and done[0].outputs["summary"] == str(run["job"].out / "summary.json")


def test_segmentation_has_named_coloured_segments_on_the_exact_input_grid(run):
    scene, volume, segmentation = run["scene"], run["volume"], run["results"].segmentation
    contents = segmentation.GetSegmentation()
    names = [contents.GetNthSegment(i).GetName() for i in range(contents.GetNumberOfSegments())]
    assert names == LABEL_NAMES[1:]
    colours = [contents.GetNthSegment(i).GetColor() for i in range(contents.GetNumberOfSegments())]
    for colour, expected in zip(colours, DEFAULT_COLORS):
        np.testing.assert_allclose(colour, [int(expected[i:i + 2], 16) / 255 for i in (1, 3, 5)], atol=1e-6)
    engine_labels = read_volume(run["out"] / "segmentation.nii.gz")
    np.testing.assert_allclose(engine_labels.geometry.affine_ras, node_matrix(volume), atol=1e-5)
    imported = segmentation_labels(scene, segmentation, volume)
    assert imported.shape == run["image"].shape
    np.testing.assert_array_equal(imported, engine_labels.array.transpose(2, 1, 0))
    assert len(np.unique(imported)) > 1, "the test needs a segmentation with foreground to compare"


def test_entropy_volume_has_the_input_geometry_and_a_perceptual_colour_map(run):
    entropy = run["results"].entropy
    np.testing.assert_allclose(node_matrix(entropy), node_matrix(run["volume"]), atol=1e-5)
    engine_entropy = read_volume(run["out"] / "entropy.nii.gz")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(entropy), engine_entropy.array.transpose(2, 1, 0), atol=1e-6)
    display = entropy.GetDisplayNode()
    colour = display.GetColorNode()
    assert colour.GetName() == "Entropy Merge entropy (magma)" and colour.GetAttribute(lib_scene.ROLE) == "entropy colours"
    assert colour.GetNumberOfColors() > 2
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(entropy)
    assert legend.GetTitleText() == "entropy (0 certain, 1 uniform)"


def table_column(table_node, name):
    column = table_node.GetTable().GetColumnByName(name)
    return [column.GetValue(row) for row in range(table_node.GetNumberOfRows())]


def test_ranking_table_holds_the_engine_rows_and_a_bar_chart_shows_them(run):
    ranking = json.loads((run["out"] / "ranking.json").read_text(encoding="utf-8"))
    table = run["results"].ranking
    assert table_column(table, "model") == [row["model"] for row in ranking["rows"]]
    np.testing.assert_allclose(table_column(table, "fused"), [row["fused"] for row in ranking["rows"]], atol=1e-9)
    np.testing.assert_allclose(table_column(table, "true_dice"), [row["true_dice"] for row in ranking["rows"]], atol=1e-9)
    assert table_column(table, "rank") == [1.0, 2.0]
    assert table.GetColumnLongName("true_dice") == "trust as it is: true Dice (the truth)"
    assert table.GetColumnDescription("true_dice") == "trust as it is; higher is better; labels: reference"
    assert table.GetColumnLongName("fused") == "fine-tune: fused GRTD+LBTC"
    assert table.GetColumnDescription("uncertainty") == "trust as it is; lower is better; labels: none"
    chart = run["results"].ranking_chart
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    shown = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert all(s.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar and s.GetTableNode() is table for s in shown)
    assert [(s.GetYColumnName(), s.GetLabelColumnName()) for s in shown] == [("true_dice", "model"), ("fused", "model")]
    assert [s.GetName().split(" ", 1)[1] for s in shown] == ["trust as it is: true Dice (the truth)", "fine-tune: fused GRTD+LBTC"]


def test_coefficient_and_dice_tables_match_the_summary(run):
    summary = read_summary(run["out"])
    coefficients = run["results"].coefficients
    assert table_column(coefficients, "model") == ["north", "south"]
    np.testing.assert_allclose(table_column(coefficients, "body alpha"),
                               [summary["coefficients"]["body"][m] for m in ("north", "south")])
    np.testing.assert_allclose(table_column(coefficients, "head beta"),
                               [summary["coefficients"]["head"][m] for m in ("north", "south")])
    assert sum(table_column(coefficients, "body alpha")) == pytest.approx(1.0, abs=1e-5)
    dice = run["results"].dice
    assert table_column(dice, "class") == ["structure 1", "structure 2", "mean"]
    np.testing.assert_allclose(table_column(dice, "Dice")[:2],
                               [summary["evaluation"]["per_class"][c]["dice"] for c in LABEL_NAMES[1:]])
    np.testing.assert_allclose(table_column(dice, "Dice south")[-1], summary["per_model"]["south"]["evaluation"]["mean_dice"])


def test_per_model_outputs_are_hidden_segmentations_and_entropy_maps(run):
    results = run["results"]
    assert sorted(results.model_segmentations) == ["north", "south"]
    assert not results.model_segmentations["north"].GetDisplayNode().GetVisibility()
    engine_labels = read_volume(run["out"] / "segmentation_south.nii.gz")
    np.testing.assert_array_equal(segmentation_labels(run["scene"], results.model_segmentations["south"], run["volume"]),
                                  engine_labels.array.transpose(2, 1, 0))
    np.testing.assert_allclose(node_matrix(results.model_entropies["north"]), node_matrix(run["volume"]), atol=1e-5)


def test_results_sit_in_a_folder_under_the_volume_study(run):
    scene, results = run["scene"], run["results"]
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(results.segmentation))
    assert hierarchy.GetItemParent(folder) == run["study"]
    assert hierarchy.GetItemName(folder) == "case Entropy Merge"
    for node in (results.entropy, results.ranking, results.ranking_chart, results.coefficients, results.dice,
                 results.model_segmentations["north"]):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == folder


def test_a_second_import_updates_the_same_nodes(run):
    scene, volume = run["scene"], run["volume"]
    before = scene.GetNumberOfNodes()
    again = lib_results.import_results(scene, volume, run["out"], segmentation=run["results"].segmentation)
    assert scene.GetNumberOfNodes() == before
    assert again.entropy is run["results"].entropy and again.ranking is run["results"].ranking
    assert again.segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_a_failing_import_leaves_no_half_made_nodes(run, tmp_path):
    scene = new_scene()
    volume = volume_node(scene, run["image"], oblique_lps_matrix())
    broken = tmp_path / "out"
    shutil.copytree(run["out"], broken)
    (broken / "ranking.csv").unlink()
    before = scene.GetNumberOfNodes()
    with pytest.raises(FileNotFoundError):
        lib_results.import_results(scene, volume, broken)
    assert scene.GetNumberOfNodes() == before


def test_reference_segment_named_after_no_label_is_refused(run):
    scene, volume = run["scene"], run["volume"]
    wrong = segmentation_from_labels(scene, run["reference_labels"], volume, {1: "liver", 2: "structure 2"}, "wrong")
    with pytest.raises(ValueError, match="segment 'liver' of wrong is none of the models' labels"):
        lib_scene.write_label_map(scene, wrong, volume, run["folder"] / "wrong.nrrd", LABEL_VALUES)


def test_scribbles_leave_unpainted_voxels_unlabelled(run):
    scene, volume = run["scene"], run["volume"]
    painted = np.zeros_like(run["reference_labels"])
    painted[7, 11, 13] = 2
    painted[0, 0, 0] = 1
    scribbles = segmentation_from_labels(scene, painted, volume, {1: "background", 2: "structure 2"}, "scribbles")
    path = lib_scene.write_label_map(scene, scribbles, volume, run["folder"] / "scribbles.nrrd", LABEL_VALUES, scribbles=True)
    written = read_volume(path).array.transpose(2, 1, 0)
    assert written[7, 11, 13] == 2 and written[0, 0, 0] == 0
    assert (written == lib_scene.UNLABELLED).sum() == written.size - 2


def test_the_merged_model_is_kept_after_the_run_and_saved_without_overwriting(run, tmp_path):
    model = run["job"].model
    assert model.is_dir() and not run["job"].work.exists()
    card = save_merged_model(model, tmp_path / "saved")
    saved = load_site_model(card)
    assert saved.card.training["method"] == "adaptive" and [s["name"] for s in saved.card.training["sources"]] == ["north", "south"]
    assert saved.card.training["coefficients"]["body"] == pytest.approx(read_summary(run["out"])["coefficients"]["body"], abs=1e-6)
    assert (tmp_path / "saved" / saved.card.weights).is_file()
    with pytest.raises(ValueError, match="already exists; choose another folder"):
        save_merged_model(model, tmp_path / "saved")
    with pytest.raises(ValueError, match="This run kept no merged model"):
        save_merged_model(tmp_path / "empty", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_cancelled_run_leaves_no_nodes_and_no_files(run, tmp_path):
    scene, volume = run["scene"], run["volume"]
    before = scene.GetNumberOfNodes()
    job = start_run(scene, volume, RunRequest(models=run["models"], device="cpu"), work_root=str(tmp_path))
    assert job.work.exists() and not job.finished
    abandon_run(job)
    assert job.process.state == "cancelled"
    assert scene.GetNumberOfNodes() == before
    assert list(tmp_path.iterdir()) == []


def test_a_case_is_segmented_next_to_its_file_and_reused_the_second_time(run, tmp_path, converters):
    scene = new_scene()
    source = volume_node(scene, run["image"], oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(source, tmp_path / "cases" / "patient7.nrrd")
    volume = lib_scene.read_volume_node(scene, case, "vtkMRMLScalarVolumeNode")
    request = RunRequest(models=run["models"], method="mean", device="cpu")
    job = start_run(scene, volume, request, case=case, work_root=str(tmp_path))
    job.process.wait(600)
    assert job.succeeded, job.process.error
    first = finish_run(scene, job)
    assert (tmp_path / "cases" / "patient7.entropymerge" / "summary.json").is_file()
    assert sorted(p.suffix for p in job.model.iterdir()) == [".json", ".safetensors"]  # kept for "Save merged model..."
    discard_model(job.model)
    again = start_run(scene, volume, request, case=case, work_root=str(tmp_path))
    assert again.process is None and again.finished and again.succeeded
    assert finish_run(scene, again).segmentation is first.segmentation
    changed = start_run(scene, volume, RunRequest(models=run["models"], method="mean", device="cpu", temperature=0.5),
                        case=case, work_root=str(tmp_path))
    assert changed.process is not None, "other options are not served from the cache"
    abandon_run(changed)
    assert not (tmp_path / "cases" / "patient7.entropymerge").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases"]


def translation_transform(scene, offset_mm=(14.0, 0.0, 0.0)):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = np.eye(4)
    matrix[:3, 3] = offset_mm
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return transform


def test_a_second_run_on_a_transformed_volume_lands_on_the_volume(run, converters):
    # Finding 3: after run 1 the segmentation sits in the volume's transform; run 2's labels must be imported there too.
    scene = new_scene()
    volume = volume_node(scene, run["image"], oblique_lps_matrix())
    volume.SetAndObserveTransformNodeID(translation_transform(scene).GetID())
    engine_labels = read_volume(run["out"] / "segmentation.nii.gz").array.transpose(2, 1, 0)
    first = lib_results.import_results(scene, volume, run["out"])
    again = lib_results.import_results(scene, volume, run["out"])
    assert again.segmentation is first.segmentation
    assert again.segmentation.GetTransformNodeID() == volume.GetTransformNodeID()
    np.testing.assert_array_equal(segmentation_labels(scene, again.segmentation, volume), engine_labels)


def test_scribbles_from_a_label_map_keep_unpainted_voxels_unlabelled(run):
    # Finding 5: Slicer's unpainted label-map voxels are 0; the engine's "unlabelled" is 255.
    scene, volume = run["scene"], run["volume"]
    painted = np.zeros_like(run["reference_labels"])
    painted[7, 11, 13], painted[3, 4, 5] = 2, 1
    scribbles = volume_node(scene, painted, oblique_lps_matrix(), "painted", "vtkMRMLLabelMapVolumeNode")
    path = lib_scene.write_label_map(scene, scribbles, volume, run["folder"] / "painted.nrrd", LABEL_VALUES, scribbles=True)
    written = read_volume(path).array.transpose(2, 1, 0)
    assert written[7, 11, 13] == 2 and written[3, 4, 5] == 1
    assert (written == lib_scene.UNLABELLED).sum() == written.size - 2


def test_a_reference_label_map_on_another_grid_is_resampled_to_the_volume_grid(run):
    # Finding 8: a reference on a finer grid (half the voxel size, shifted by half a voxel of it) is taken, not refused.
    scene, volume = run["scene"], run["volume"]
    volume_matrix = oblique_lps_matrix()
    fine_matrix = volume_matrix.copy()
    fine_matrix[:3, :3] = volume_matrix[:3, :3] / 2
    fine_matrix[:3, 3] = volume_matrix[:3, 3] - volume_matrix[:3, :3] @ np.array([0.25, 0.25, 0.25])
    fine = np.repeat(np.repeat(np.repeat(run["reference_labels"], 2, axis=0), 2, axis=1), 2, axis=2)
    reference = volume_node(scene, fine, fine_matrix, "fine reference", "vtkMRMLLabelMapVolumeNode")
    path = lib_scene.write_label_map(scene, reference, volume, run["folder"] / "fine.nrrd", LABEL_VALUES)
    written = read_volume(path)
    np.testing.assert_allclose(written.geometry.affine_ras, volume_matrix, atol=1e-6)
    np.testing.assert_array_equal(written.array.transpose(2, 1, 0), run["reference_labels"])


def test_a_reference_label_map_in_another_transform_is_resampled_through_it(run):
    scene, volume = run["scene"], run["volume"]
    shifted_matrix = oblique_lps_matrix()
    shifted_matrix[:3, 3] -= (0.0, 0.0, 2 * 2.5)  # two slices lower ...
    reference = volume_node(scene, run["reference_labels"], shifted_matrix, "shifted reference", "vtkMRMLLabelMapVolumeNode")
    reference.SetAndObserveTransformNodeID(translation_transform(scene, (0.0, 0.0, 2 * 2.5)).GetID())  # ... moved back up
    written = read_volume(lib_scene.write_label_map(scene, reference, volume, run["folder"] / "moved.nrrd", LABEL_VALUES))
    np.testing.assert_array_equal(written.array.transpose(2, 1, 0), run["reference_labels"])


def test_a_case_visited_again_reuses_its_volume_node(tmp_path):
    # Finding 7: Previous/Next must not load a case (and then its results) again on every visit.
    scene = new_scene()
    image, _ = phantom()
    source = volume_node(scene, image, oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(source, tmp_path / "patient3.nrrd")
    loads = []

    def load(path):
        loads.append(path)
        return lib_scene.read_volume_node(scene, path, "vtkMRMLScalarVolumeNode")

    first = lib_scene.case_volume(scene, case, load)
    count = scene.GetNumberOfNodes()
    assert lib_scene.case_volume(scene, tmp_path / "." / "patient3.nrrd", load) is first
    assert scene.GetNumberOfNodes() == count and loads == [case]
    other = lib_scene.write_volume_node(source, tmp_path / "patient4.nrrd")
    assert lib_scene.case_volume(scene, other, load) is not first and len(loads) == 2


def test_a_case_run_with_a_reference_is_reused_the_second_time(run, tmp_path, converters):
    # Finding 6: the reference goes through a new temporary file each run; the case compares its content.
    scene = new_scene()
    volume = volume_node(scene, run["image"], oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(volume, tmp_path / "cases" / "patient8.nrrd")
    reference = segmentation_from_labels(scene, run["reference_labels"], volume, {1: "structure 1", 2: "structure 2"})
    request = RunRequest(models=run["models"], method="mean", device="cpu")
    job = start_run(scene, volume, request, labels=reference, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    job.process.wait(600)
    assert job.succeeded, job.process.error
    finish_run(scene, job)
    again = start_run(scene, volume, request, labels=reference, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    assert again.process is None, "the same reference is served from the case's results"
    finish_run(scene, again)
    edited = run["reference_labels"].copy()
    edited[edited == 2] = 1
    other = segmentation_from_labels(scene, edited, volume, {1: "structure 1"}, "edited")
    changed = start_run(scene, volume, request, labels=other, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    assert changed.process is not None, "another reference runs the engine again"
    abandon_run(changed)


def test_a_reference_label_map_behind_a_non_linear_transform_is_refused_with_the_way_out(run):
    scene, volume = run["scene"], run["volume"]
    reference = volume_node(scene, run["reference_labels"], oblique_lps_matrix(), "warped reference", "vtkMRMLLabelMapVolumeNode")
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
        lib_scene.write_label_map(scene, reference, volume, run["folder"] / "warped.nrrd", LABEL_VALUES)
