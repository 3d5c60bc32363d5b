"""The MRML side of a run: volumes and label maps out to files, the engine's outputs back in as nodes.

Every function takes the scene (or nodes of it) as a parameter and uses no Qt, so it runs on a
plain ``vtkMRMLScene``. Files are written and read with Slicer's own volume storage node, which
keeps the IJK-to-RAS geometry exactly.

Results are nodes that know their role and their input volume (node attributes), so a second run
on the same volume updates them in place instead of piling up copies; they are placed in a folder
under the input volume's study in the subject hierarchy.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from . import tr as _
from .engine import read_summary

ROLE = "EntropyMerge.Role"
SOURCE = "EntropyMerge.Volume"
CASE = "EntropyMerge.Case"  # on a volume loaded from a case file: the file's resolved path
ENTROPY_COLORMAP = "magma"  # the perceptual map of the engine's figures (entropymerge.figures)
UNLABELLED = 255  # the engine's default --unlabelled-value for scribbles


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


def find_node(scene, class_name: str, attributes: dict[str, str]):
    """The first node of ``class_name`` that has all these attribute values, or None."""
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if all(node.GetAttribute(key) == value for key, value in attributes.items()):
            return node
    return None


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
    the run holds them. If anything fails, the nodes made here are removed before the error is raised.
    """
    summary = read_summary(run_folder)
    outputs = summary["outputs"]
    labels = summary["labels"]
    name = volume.GetName()
    build = _ResultBuilder(scene, volume)
    try:
        results = ImportedResults(build.node("vtkMRMLSegmentationNode", "segmentation", _("{volume} segmentation").format(volume=name),
                                             segmentation))
        fill_segmentation(scene, results.segmentation, outputs["segmentation"], labels, volume)
        if entropy:
            results.entropy = build.node("vtkMRMLScalarVolumeNode", "entropy", _("{volume} entropy").format(volume=name))
            fill_entropy(scene, results.entropy, outputs["entropy"])
        for model in summary["models"]:
            model_name = model["name"]
            if f"segmentation_{model_name}" not in outputs:
                continue
            node = build.node("vtkMRMLSegmentationNode", f"segmentation:{model_name}",
                              _("{volume} segmentation {model}").format(volume=name, model=model_name))
            fill_segmentation(scene, node, outputs[f"segmentation_{model_name}"], labels, volume)
            node.GetDisplayNode().SetVisibility(False)
            results.model_segmentations[model_name] = node
            if entropy:
                node = build.node("vtkMRMLScalarVolumeNode", f"entropy:{model_name}",
                                  _("{volume} entropy {model}").format(volume=name, model=model_name))
                fill_entropy(scene, node, outputs[f"entropy_{model_name}"])
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
            columns = (summary.get("ranking") or {}).get("columns") or []
            describe_ranking_columns(results.ranking, columns)
            results.ranking_chart = ranking_chart(build, results.ranking, name, columns, (summary.get("ranking") or {}).get("as_is_basis"))
        for node in build.touched:
            _follow_volume(node, volume)
        place_in_study(scene, volume, build.touched)
    except BaseException:
        build.discard_added()
        raise
    return results


def fill_segmentation(scene, segmentation, labels_path: str, labels: list[dict], volume) -> None:
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
    for label in sorted(labels, key=lambda item: item["value"])[1:]:
        segment_ids.InsertNextValue(contents.AddEmptySegment(label["name"], label["name"], _rgb(label["color"])))
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


def coefficient_rows(summary: dict) -> tuple[list[str], list[dict]] | None:
    """Columns and rows of the merging coefficients (``None`` for a method without coefficients)."""
    body, head = summary["coefficients"]["body"], summary["coefficients"]["head"]
    if body is None:
        return None
    statistic = summary.get("merge_details", {}).get("statistic")
    uncertainty = (summary.get("probe_statistics") or {}).get(statistic) if statistic else None
    columns = ["model", "site", "body alpha", "head beta"] + ([f"H ({statistic})"] if uncertainty else [])
    rows = []
    for model in summary["models"]:
        row = {"model": model["name"], "site": model.get("site") or "", "body alpha": body[model["name"]],
               "head beta": head[model["name"]]}
        if uncertainty:
            row[f"H ({statistic})"] = uncertainty[model["name"]]
        rows.append(row)
    return columns, rows


def dice_rows(summary: dict) -> tuple[list[str], list[dict]] | None:
    """Dice and HD95 per class against the reference: the merged model, then each site model run in full."""
    evaluation = summary.get("evaluation")
    if not evaluation:
        return None
    per_model = {name: entry["evaluation"] for name, entry in (summary.get("per_model") or {}).items() if entry.get("evaluation")}
    columns = ["class", "Dice", "HD95 (mm)"] + [f"Dice {name}" for name in per_model]
    rows = []
    for label, scores in evaluation["per_class"].items():
        row = {"class": label, "Dice": scores["dice"], "HD95 (mm)": scores["hd95_mm"]}
        for name, model_evaluation in per_model.items():
            row[f"Dice {name}"] = model_evaluation["per_class"][label]["dice"]
        rows.append(row)
    mean = {"class": "mean", "Dice": evaluation["mean_dice"], "HD95 (mm)": evaluation["mean_hd95_mm"]}
    for name, model_evaluation in per_model.items():
        mean[f"Dice {name}"] = model_evaluation["mean_dice"]
    return columns, rows + [mean]


def csv_rows(path: str) -> tuple[list[str], list[dict]]:
    """Columns and rows of a CSV file the engine wrote (e.g. ``ranking.csv``)."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def fill_table(table_node, columns: list[str], rows: list[dict]) -> None:
    """Replace the table's contents: numeric columns as numbers (a missing value is NaN), others as text."""
    table = vtk.vtkTable()
    for column in columns:
        values = [row.get(column) for row in rows]
        numbers = [_number(value) for value in values]
        if all(number is not None or value in (None, "") for number, value in zip(numbers, values)) and any(n is not None for n in numbers):
            array = vtk.vtkDoubleArray()
            for number in numbers:
                array.InsertNextValue(math.nan if number is None else number)
        else:
            array = vtk.vtkStringArray()
            for value in values:
                array.InsertNextValue("" if value is None else str(value))
        array.SetName(column)
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def question_title(question: str | None) -> str | None:
    """The panel's short name of the question a ranking column answers (translated when called)."""
    return {"as is": _("trust as it is"), "transfer": _("fine-tune")}.get(question or "")


def describe_ranking_columns(ranking_table, columns: list[dict]) -> None:
    """Each ranking column's long name says which question it answers; its description adds which way
    is better and the labels it used (the engine's ``ranking.json`` column list)."""
    for column in columns:
        key = column["key"]
        if ranking_table.GetTable().GetColumnByName(key) is None:
            continue
        question = question_title(column["question"])
        ranking_table.SetColumnLongName(key, f"{question}: {column['title']}" if question else column["title"])
        parts = [question or "", _("{better} is better").format(better=column["better"]) if column["better"] else "",
                 _("labels: {labels}").format(labels=column["labels"])]
        ranking_table.SetColumnDescription(key, "; ".join(part for part in parts if part))


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


def case_volume(scene, case: str | Path, load):
    """The volume node of a case file: the one loaded on an earlier visit, else ``load(case)`` marked as that case."""
    key = str(Path(case).resolve())
    existing = find_node(scene, "vtkMRMLScalarVolumeNode", {CASE: key})
    if existing is not None:
        return existing
    node = load(case)
    node.SetAttribute(CASE, key)
    return node


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
