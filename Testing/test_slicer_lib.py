"""SlicerEntropyMergeLib on a real MRML scene (slicer-core): a volume node goes out to the real engine and
its results come back as nodes on the volume's exact grid, named, coloured and placed in the study."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML scene")
import slicer.util  # noqa: E402, F811

from entropymerge.errors import UserInputError  # noqa: E402
from entropymerge.modelcard import DEFAULT_COLORS  # noqa: E402
from entropymerge.models import load_site_model  # noqa: E402
from entropymerge.summary import read_summary  # noqa: E402
from entropymerge.volume import read_volume  # noqa: E402
from slicer_scene import LABEL_NAMES, new_scene, node_matrix, oblique_lps_matrix, segmentation_labels, translation_transform, volume_node  # noqa: E402
from slicer_scene import converters as converters  # noqa: E402 (a fixture: the alias marks it as used)
from slicer_scene import run as run  # noqa: E402 (a fixture: the alias marks it as used)
from SlicerEntropyMergeLib import results as lib_results  # noqa: E402
from SlicerEntropyMergeLib import scene as lib_scene  # noqa: E402
from SlicerEntropyMergeLib.engine import RunRequest  # noqa: E402
from SlicerEntropyMergeLib.job import abandon_run, save_merged_model, start_run  # noqa: E402


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
    assert summary.evaluation.classes_in_reference == LABEL_NAMES[1:]
    assert summary.ranking.label_source == "reference"
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
                               [summary.coefficients.body[m] for m in ("north", "south")])
    np.testing.assert_allclose(table_column(coefficients, "head beta"),
                               [summary.coefficients.head[m] for m in ("north", "south")])
    assert sum(table_column(coefficients, "body alpha")) == pytest.approx(1.0, abs=1e-5)
    dice = run["results"].dice
    assert table_column(dice, "class") == ["structure 1", "structure 2", "mean"]
    np.testing.assert_allclose(table_column(dice, "Dice")[:2],
                               [summary.evaluation.per_class[c].dice for c in LABEL_NAMES[1:]])
    np.testing.assert_allclose(table_column(dice, "Dice south")[-1], summary.per_model["south"].evaluation.mean_dice)



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



def test_a_failing_import_leaves_no_half_made_nodes_and_an_unreadable_summary_says_why(run, tmp_path):
    scene = new_scene()
    volume = volume_node(scene, run["image"], oblique_lps_matrix())
    broken = tmp_path / "out"
    shutil.copytree(run["out"], broken)
    (broken / "ranking.csv").unlink()
    before = scene.GetNumberOfNodes()
    with pytest.raises(FileNotFoundError):
        lib_results.import_results(scene, volume, broken)
    assert scene.GetNumberOfNodes() == before
    (broken / "summary.json").unlink()
    with pytest.raises(UserInputError, match="holds no finished run"):
        lib_results.import_results(scene, volume, broken)
    (broken / "summary.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserInputError, match="summary.json is not a complete run summary: the key 'entropymerge_version' is missing"):
        lib_results.import_results(scene, volume, broken)
    assert scene.GetNumberOfNodes() == before



def test_the_merged_model_is_kept_after_the_run_and_saved_without_overwriting(run, tmp_path):
    model = run["job"].model
    assert model.is_dir() and not run["job"].work.exists()
    card = save_merged_model(model, tmp_path / "saved")
    saved = load_site_model(card)
    assert saved.card.training["method"] == "adaptive" and [s["name"] for s in saved.card.training["sources"]] == ["north", "south"]
    assert saved.card.training["coefficients"]["body"] == pytest.approx(read_summary(run["out"]).coefficients.body, abs=1e-6)
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
