"""The run's tables as the scene shows them: merging coefficients, Dice against the reference, and the
transferability ranking (rows from the run summary or the engine's CSV, into table nodes)."""

from __future__ import annotations

import csv
import math

import vtk

from entropymerge.summary import RunSummary

from . import tr as _


def coefficient_rows(summary: RunSummary) -> tuple[list[str], list[dict]] | None:
    """Columns and rows of the merging coefficients (``None`` for a method without coefficients)."""
    body, head = summary.coefficients.body, summary.coefficients.head
    if body is None:
        return None
    statistic = summary.merge_details.get("statistic")
    uncertainty = (summary.probe_statistics or {}).get(statistic) if statistic else None
    columns = ["model", "site", "body alpha", "head beta"] + ([f"H ({statistic})"] if uncertainty else [])
    rows = []
    for model in summary.models:
        row = {"model": model.name, "site": model.site or "", "body alpha": body[model.name], "head beta": head[model.name]}
        if uncertainty:
            row[f"H ({statistic})"] = uncertainty[model.name]
        rows.append(row)
    return columns, rows


def dice_rows(summary: RunSummary) -> tuple[list[str], list[dict]] | None:
    """Dice and HD95 per class against the reference: the merged model, then each site model run in full."""
    evaluation = summary.evaluation
    if evaluation is None:
        return None
    per_model = {name: entry.evaluation for name, entry in (summary.per_model or {}).items() if entry.evaluation}
    columns = ["class", "Dice", "HD95 (mm)"] + [f"Dice {name}" for name in per_model]
    rows = []
    for label, scores in evaluation.per_class.items():
        row = {"class": label, "Dice": scores.dice, "HD95 (mm)": scores.hd95_mm}
        for name, model_evaluation in per_model.items():
            row[f"Dice {name}"] = model_evaluation.per_class[label].dice
        rows.append(row)
    mean = {"class": "mean", "Dice": evaluation.mean_dice, "HD95 (mm)": evaluation.mean_hd95_mm}
    for name, model_evaluation in per_model.items():
        mean[f"Dice {name}"] = model_evaluation.mean_dice
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
