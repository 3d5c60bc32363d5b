"""What the panel shows: the site models table, the case navigation line, and a run's results."""

from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _


def fill_models_table(ui, report, paths: list[str], checking: bool, single_model: str) -> str:
    """List the site models (name, site, labels, compatibility) and offer the compatible ones for the single method.

    Args:
        ui: the panel's widgets (``modelsTable``, ``singleModelComboBox``).
        report: the engine's ``ModelReport`` on ``paths``, or ``None`` before it came.
        paths: the listed model files and folders.
        checking: whether the check that makes the report is under way.
        single_model: the model the single method runs, kept selected when it is still offered.

    Returns:
        The model now selected for the single method ("" when none is offered).
    """
    table = ui.modelsTable
    entries = report.models if report else [{"name": Path(p).name, "source": p} for p in paths]
    table.setRowCount(len(entries))
    for row, entry in enumerate(entries):
        if report is None:
            status = _("checking...") if checking else _("not checked yet (Apply checks it)")
        else:
            status = _("compatible") if entry["compatible"] else entry["problem"]
        labels = ", ".join(label["name"] for label in entry.get("labels", [])[1:])
        for column, text in enumerate((entry["name"], entry.get("site") or "", labels, status)):
            item = qt.QTableWidgetItem(text)
            item.setToolTip(entry["source"] if column == 0 else text)
            if report is not None and not entry["compatible"]:
                item.setForeground(qt.QBrush(qt.QColor("red")))
            table.setItem(row, column, item)
    table.resizeColumnsToContents()
    combo = ui.singleModelComboBox
    wasBlocked = combo.blockSignals(True)
    combo.clear()
    for entry in entries:
        if report is not None and entry["compatible"]:
            combo.addItem(entry["name"])
    combo.setCurrentText(single_model)
    combo.blockSignals(wasBlocked)
    return combo.currentText if combo.count else ""


def case_label(case_files: list[Path], index: int, folder_chosen: bool) -> str:
    """The case navigation line: how many cases, and which one is loaded (``index`` -1: none yet)."""
    count = len(case_files)
    if not count:
        return _("no cases in the chosen folder") if folder_chosen else _("no case folder chosen")
    if index < 0:
        return _("{count} cases; Next loads the first").format(count=count)
    return _("case {index} of {count}: {name}").format(index=index + 1, count=count, name=case_files[index].name)


def show_results(ui, volume, results) -> None:
    """Show a run's entropy map over its volume and its coefficient, ranking and Dice tables (those it has)."""
    if results.entropy is not None:
        slicer.util.setSliceViewerLayers(background=volume, foreground=results.entropy, foregroundOpacity=0.4)
    else:
        slicer.util.setSliceViewerLayers(background=volume, foreground=None)
    for view, label, table in ((ui.coefficientsTableView, ui.coefficientsLabel, results.coefficients),
                               (ui.rankingTableView, ui.rankingLabel, results.ranking),
                               (ui.diceTableView, ui.diceLabel, results.dice)):
        view.setMRMLTableNode(table)
        view.visible = label.visible = table is not None
    ui.showChartButton.enabled = results.ranking_chart is not None
    ui.resultsCollapsibleButton.collapsed = False

