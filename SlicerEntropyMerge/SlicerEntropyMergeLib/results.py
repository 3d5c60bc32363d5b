"""The engine's outputs brought into the scene: a run's folder as result nodes on the input volume's grid.

Results are nodes that know their role and their input volume (node attributes), so a second run
on the same volume updates them in place instead of piling up copies; they are placed in a folder
under the input volume's study in the subject hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from entropymerge.summary import LabelRecord, output_key, read_summary

from . import tr as _
from .scene import ROLE, SOURCE, find_node, read_volume_node
from .tables import coefficient_rows, csv_rows, describe_ranking_columns, dice_rows, fill_table, question_title

ENTROPY_COLORMAP = "magma"  # the perceptual map of the engine's figures (entropymerge.figures)


@dataclass
class ImportedResults:
    """The nodes a run produced (``None`` or empty where the run or the user asked for none)."""

    segmentation: object
    entropy: object = None
    model_segmentations: dict = field(default_factory=dict)
    model_entropies: dict = field(default_factory=dict)
    coefficients: object = None
    dice: object = None
    ranking: object = None
    ranking_chart: object = None


class _ResultBuilder:
    """Finds or makes the result nodes of one volume; if the import fails, removes every node added since it began."""

    def __init__(self, scene, volume):
        self.scene, self.volume = scene, volume
        self.touched: list = []
        self._before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def node(self, class_name: str, role: str, name: str, given=None):
        attributes = {ROLE: role, SOURCE: self.volume.GetID()}
        node = given or find_node(self.scene, class_name, attributes) or self.scene.AddNewNodeByClass(class_name, name)
        for key, value in attributes.items():
            node.SetAttribute(key, value)
        self.touched.append(node)
        return node

    def discard_added(self) -> None:
        """Remove the nodes added since the import began (results, their display nodes, colour maps ...)."""
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in self._before]):
            self.scene.RemoveNode(node)


def import_results(scene, volume, run_folder: str | Path, segmentation=None, entropy: bool = True) -> ImportedResults:
    """Bring a finished run (the engine's output folder) into the scene, on ``volume``'s grid.

    ``segmentation`` receives the merged segmentation (a new node when ``None``); ``entropy``
    imports the entropy map(s). Per-model outputs, coefficients, Dice and ranking are imported when
    the run holds them. If anything fails, the nodes made here are removed before the error is raised;
    a folder without a readable run summary raises ``UserInputError`` saying why.
    """
    summary = read_summary(run_folder)
    outputs = summary.outputs
    labels = summary.labels
    name = volume.GetName()
    build = _ResultBuilder(scene, volume)
    try:
        results = ImportedResults(build.node("vtkMRMLSegmentationNode", "segmentation", _("{volume} segmentation").format(volume=name),
                                             segmentation))
        fill_segmentation(scene, results.segmentation, outputs[output_key("segmentation")], labels, volume)
        if entropy:
            results.entropy = build.node("vtkMRMLScalarVolumeNode", "entropy", _("{volume} entropy").format(volume=name))
            fill_entropy(scene, results.entropy, outputs[output_key("entropy")])
        for model_name in summary.model_names:
            if output_key("segmentation", model_name) not in outputs:
                continue
            node = build.node("vtkMRMLSegmentationNode", f"segmentation:{model_name}",
                              _("{volume} segmentation {model}").format(volume=name, model=model_name))
            fill_segmentation(scene, node, outputs[output_key("segmentation", model_name)], labels, volume)
            node.GetDisplayNode().SetVisibility(False)
            results.model_segmentations[model_name] = node
            if entropy:
                node = build.node("vtkMRMLScalarVolumeNode", f"entropy:{model_name}",
                                  _("{volume} entropy {model}").format(volume=name, model=model_name))
                fill_entropy(scene, node, outputs[output_key("entropy", model_name)])
                results.model_entropies[model_name] = node
        coefficients = coefficient_rows(summary)
        if coefficients:
            results.coefficients = build.node("vtkMRMLTableNode", "coefficients", _("{volume} merging coefficients").format(volume=name))
            fill_table(results.coefficients, *coefficients)
        dice = dice_rows(summary)
        if dice:
            results.dice = build.node("vtkMRMLTableNode", "dice", _("{volume} Dice").format(volume=name))
            fill_table(results.dice, *dice)
        if "ranking_csv" in outputs:
            results.ranking = build.node("vtkMRMLTableNode", "ranking", _("{volume} ranking").format(volume=name))
            fill_table(results.ranking, *csv_rows(outputs["ranking_csv"]))
            columns = summary.ranking.columns if summary.ranking else []
            describe_ranking_columns(results.ranking, columns)
            as_is_basis = summary.ranking.as_is_basis if summary.ranking else None
            results.ranking_chart = ranking_chart(build, results.ranking, name, columns, as_is_basis)
        for node in build.touched:
            _follow_volume(node, volume)
        place_in_study(scene, volume, build.touched)
    except BaseException:
        build.discard_added()
        raise
    return results


def fill_segmentation(scene, segmentation, labels_path: str, labels: list[LabelRecord], volume) -> None:
    """One named, coloured segment per foreground label, from the engine's label map, on ``volume``'s grid.

    Segments are replaced in place, so a segmentation reused for another run keeps its node and
    display settings; every label gets its segment, empty when the model found none of it.
    """
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    _follow_volume(segmentation, volume)
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    contents = segmentation.GetSegmentation()
    contents.RemoveAllSegments()
    segment_ids = vtk.vtkStringArray()  # entry v-1 receives label value v
    for label in sorted(labels, key=lambda item: item.value)[1:]:
        segment_ids.InsertNextValue(contents.AddEmptySegment(label.name, label.name, _rgb(label.color)))
    label_map = read_volume_node(scene, labels_path, "vtkMRMLLabelMapVolumeNode")
    _follow_volume(label_map, volume)  # the engine's labels are on the volume's grid: in its transform, like the segmentation
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_map, segmentation, segment_ids):
            raise RuntimeError(f"could not import the segmentation {labels_path}")
    finally:
        scene.RemoveNode(label_map)


def _rgb(color: str) -> tuple[float, float, float]:
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))


def fill_entropy(scene, node, path: str) -> None:
    """The engine's entropy map in ``node``, shown with a perceptual colour map over its fixed range [0, 1]."""
    read_volume_node(scene, path, "vtkMRMLScalarVolumeNode", node)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(entropy_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node).SetTitleText(_("entropy (0 certain, 1 uniform)"))


def entropy_color_node(scene):
    """The scene's entropy colour map (matplotlib's perceptually uniform magma), made once."""
    existing = find_node(scene, "vtkMRMLProceduralColorNode", {ROLE: "entropy colours"})
    if existing is not None:
        return existing
    import matplotlib

    colormap = matplotlib.colormaps[ENTROPY_COLORMAP]
    function = vtk.vtkColorTransferFunction()
    for position in np.linspace(0.0, 1.0, 64):
        red, green, blue = colormap(position)[:3]
        function.AddRGBPoint(position, red, green, blue)
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", _("Entropy Merge entropy ({colormap})").format(colormap=ENTROPY_COLORMAP))
    node.SetAttribute(ROLE, "entropy colours")
    node.SetAndObserveColorTransferFunction(function)
    return node


def ranking_chart(build: _ResultBuilder, ranking_table, name: str, columns: list[dict], as_is_basis: str | None):
    """A bar chart of the ranking: the score that orders the as-is ranking (the true Dice when known) and the
    fused transferability score, each titled with its question."""
    chart = build.node("vtkMRMLPlotChartNode", "ranking chart", _("{volume} ranking chart").format(volume=name))
    chart.RemoveAllPlotSeriesNodeIDs()
    chart.SetTitle(_("Which site model to trust as it is, which to fine-tune: {volume}").format(volume=name))
    chart.SetXAxisTitle(_("site model (as-is rank)"))
    chart.SetYAxisTitle(_("score"))
    titles = {c["key"]: c["title"] for c in columns}
    present = {ranking_table.GetTable().GetColumnName(i) for i in range(ranking_table.GetNumberOfColumns())}
    shown = [(as_is_basis, question_title("as is"), (0.90, 0.62, 0.0)), ("fused", question_title("transfer"), (0.0, 0.45, 0.70))]
    for column, question, color in shown:
        if column not in present or not ranking_table.GetTable().GetColumnByName(column).IsNumeric():
            continue
        series = build.node("vtkMRMLPlotSeriesNode", f"ranking series:{column}", f"{name} {question}: {titles.get(column, column)}")
        series.SetAndObserveTableNodeID(ranking_table.GetID())
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        series.SetYColumnName(column)
        series.SetLabelColumnName("model")
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def _follow_volume(node, volume) -> None:
    """Results sit in the same transform as their volume, so they overlay it wherever it moves."""
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())


def place_in_study(scene, volume, nodes: list) -> int:
    """Put ``nodes`` in a folder named after the run, under the volume's parent (its study); returns the folder."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = hierarchy.GetItemByDataNode(volume)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else hierarchy.GetSceneItemID()
    folder = results_folder_item(hierarchy, parent, volume)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(folder, node)
        hierarchy.SetItemParent(item, folder)
    return folder


def results_folder_item(hierarchy, parent: int, volume) -> int:
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(parent, children)
    for index in range(children.GetNumberOfIds()):
        item = children.GetId(index)
        if hierarchy.GetItemAttribute(item, SOURCE) == volume.GetID():
            return item
    folder = hierarchy.CreateFolderItem(parent, _("{volume} Entropy Merge").format(volume=volume.GetName()))
    hierarchy.SetItemAttribute(folder, SOURCE, volume.GetID())
    return folder
