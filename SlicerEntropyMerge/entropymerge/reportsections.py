"""The sections of the HTML report (``report.render_report``): HTML fragments made from the run summary.

Every text from the summary is escaped; numbers are formatted here, so the page shows what the
summary holds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps

from .figures import ENTROPY_COLORMAP, ENTROPY_LABEL, VIEWS
from .methods import one_model_used
from .modelcard import Label
from .summary import Evaluation, RunSummary

SERIES_COLORS = ("#0072b2", "#e69f00")  # body alpha, head beta (Okabe-Ito)


@dataclass
class Layer:
    """A segmentation shown in the report: the merged model's or one site model's."""

    title: str
    subtitle: str
    labels: np.ndarray  # (i, j, k) label values on the target grid


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def result_title(summary: RunSummary) -> str:
    """What produced the run's segmentation.

    Args:
        summary: the run's summary.

    Returns:
        ``"<method>: <model>"`` when one site model ran as it is, else ``"merged (<method>)"``.
    """
    used = one_model_used(summary.method, summary.coefficients.body)
    if used:
        return f"{summary.method}: {used}"
    return f"merged ({summary.method})"


def dice_text(evaluation: Evaluation | None) -> str:
    """A segmentation's mean Dice as a caption.

    Args:
        evaluation: the segmentation against the reference, or None.

    Returns:
        ``"mean Dice 0.812"``, or an empty text without an evaluation or a mean.
    """
    return f"mean Dice {evaluation.mean_dice:.3f}" if evaluation and evaluation.mean_dice is not None else ""


def model_subtitle(summary: RunSummary, name: str) -> str:
    """The caption of a site model in the grid.

    Args:
        summary: the run's summary.
        name: the site model's name.

    Returns:
        Its coefficients (alpha; beta when the head was decoupled) and its mean Dice when it ran on its
        own against a reference, joined by " · ".
    """
    coefficients = summary.coefficients
    shown = (("body", "α"), ("head", "β")) if summary.decoupled_head else (("body", "α"),)
    parts = [f"{symbol} {getattr(coefficients, key)[name]:.3f}" for key, symbol in shown if getattr(coefficients, key)]
    entry = (summary.per_model or {}).get(name)
    evaluation = entry.evaluation if entry else None
    return " · ".join(parts + ([dice_text(evaluation)] if evaluation else []))


NUMERIC = ' class="n"'
DICE_CAPTION = ("Dice: overlap, 0 to 1, higher is better (best mean in bold). "
                "HD95: 95th-percentile surface distance in mm, lower is better.")


def _table(header: list[str], rows: list[list[str]], caption: str = "", text_columns: int = 1) -> str:
    """An HTML table of ready-made cells; the first ``text_columns`` are text, the others numbers (right-aligned)."""
    def cells(tag, row):
        return "".join(f"<{tag}{'' if i < text_columns else NUMERIC}>{c}</{tag}>" for i, c in enumerate(row))

    head = cells("th", header)
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table>{f'<caption>{caption}</caption>' if caption else ''}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def run_facts(summary: RunSummary) -> str:
    """The page's subtitle.

    Args:
        summary: the run's summary.

    Returns:
        An HTML paragraph: method, site models, device, date and target.
    """
    models = ", ".join(_e(name) for name in summary.model_names)
    return (f"<p class=\"facts\"><b>Method</b> {_e(summary.method)} · <b>site models</b> {models} · "
            f"<b>device</b> {_e(summary.device)} · <b>created</b> {_e(summary.created)}<br>"
            f"<b>Target</b> {_e(summary.volume.path)}: {_e(summary.volume.geometry)}</p>")


def views_section(labels: tuple[Label, ...], subsampled: bool) -> str:
    """The three views (scan with the segmentation, entropy map), their sliders and the colour bar.

    Args:
        labels: the classes, background first (the legend shows the others).
        subsampled: the previews hold every n-th voxel only (the page says so).

    Returns:
        An HTML section whose canvases the page's script draws.
    """
    legend = "".join(f"<span class=\"swatch\" style=\"background:{label.color}\"></span>{_e(label.name)} " for label in labels[1:])
    columns = "".join(
        f"<div class=\"view\"><h3>{view.capitalize()}</h3><p class=\"pixel\" data-view=\"{view}\"></p>"
        f"{_framed('overlay', view)}{_framed('entropy', view)}"
        f"<input type=\"range\" id=\"slice-{view}\" min=\"0\" aria-label=\"{view} slice\">"
        f"<output id=\"slice-{view}-text\"></output></div>" for view in VIEWS)
    note = "<p class=\"note\">Large volume: shown with every n-th voxel per axis (the files hold full resolution).</p>" if subsampled else ""
    return (f"<section id=\"views\"><h2>Target with the merged segmentation, and where the model is unsure</h2>"
            f"<p class=\"controls\"><label><input type=\"checkbox\" id=\"show-overlay\" checked> show the segmentation</label> "
            f"<label>· overlay opacity <input type=\"range\" id=\"opacity\" min=\"0\" max=\"1\" step=\"0.05\"></label> "
            f"<span class=\"legend\">{legend}</span></p>"
            f"<div class=\"views\">{columns}</div>{_colour_bar()}{note}"
            f"<p class=\"note\">Top row: the scan with the merged segmentation; bottom row: the merged model's voxel-wise entropy. "
            f"Radiological view: the patient's right is on the left of the screen (R/L/A/P/S/I mark the sides).</p></section>")


def _framed(role: str, view: str) -> str:
    edges = "".join(f"<span class=\"edge {side}\" data-view=\"{view}\" data-edge=\"{i}\"></span>"
                    for i, side in enumerate(("top", "right", "bottom", "left")))
    scale = f"<span class=\"scale\" data-view=\"{view}\"></span>" if role == "overlay" else ""
    return f"<div class=\"frame\"><canvas data-role=\"{role}\" data-view=\"{view}\"></canvas>{edges}{scale}</div>"


def _colour_bar(width: int = 360) -> str:
    stops = "".join(f"<stop offset=\"{t:.2f}\" stop-color=\"#{''.join(f'{round(c * 255):02x}' for c in colormaps[ENTROPY_COLORMAP](t)[:3])}\"/>"
                    for t in np.linspace(0, 1, 11))
    ticks = "".join(f"<line x1=\"{10 + t * width:.1f}\" y1=\"26\" x2=\"{10 + t * width:.1f}\" y2=\"31\" stroke=\"#333\"/>"
                    f"<text x=\"{10 + t * width:.1f}\" y=\"43\" text-anchor=\"middle\">{t:g}</text>" for t in (0, 0.25, 0.5, 0.75, 1))
    return (f"<svg class=\"colour-bar\" width=\"{width + 20}\" height=\"64\" role=\"img\" aria-label=\"entropy colour bar\">"
            f"<defs><linearGradient id=\"entropy-gradient\">{stops}</linearGradient></defs>"
            f"<rect x=\"10\" y=\"8\" width=\"{width}\" height=\"18\" fill=\"url(#entropy-gradient)\" stroke=\"#333\"/>{ticks}"
            f"<text x=\"{10 + width / 2}\" y=\"60\" text-anchor=\"middle\">{_e(ENTROPY_LABEL)}</text></svg>")


def grid_section(layers: list[Layer]) -> str:
    """The merged and site-model segmentations side by side on one slice (canvases drawn by the script).

    Args:
        layers: the merged segmentation first, then each site model's own.

    Returns:
        An HTML section.
    """
    radios = "".join(f"<label><input type=\"radio\" name=\"grid-view\" value=\"{view}\"{' checked' if view == 'axial' else ''}> "
                     f"{view}</label> " for view in VIEWS)
    cells = "".join(f"<figure class=\"cell\"><div class=\"frame\"><canvas data-layer=\"{i}\"></canvas></div>"
                    f"<figcaption><b>{_e(layer.title)}</b><br>{_e(layer.subtitle)}</figcaption></figure>"
                    for i, layer in enumerate(layers))
    missing = ("" if len(layers) > 1 else "<p class=\"note\">The site models' own segmentations were not computed for this run; "
               "run it with <code>--per-model</code> to compare them here.</p>")
    return (f"<section id=\"grid\"><h2>Merged and site-model segmentations on the same slice</h2>"
            f"<p class=\"controls\">{radios}<input type=\"range\" id=\"grid-slice\" min=\"0\" aria-label=\"grid slice\"> "
            f"<output id=\"grid-slice-text\"></output></p><div class=\"cells\">{cells}</div>{missing}</section>")


def coefficients_section(summary: RunSummary) -> str:
    """The merging coefficients: a bar chart and a table (with each model's probe score), or what the method did instead.

    Args:
        summary: the run's summary.

    Returns:
        An HTML section.
    """
    coefficients = summary.coefficients
    names = summary.model_names
    if not coefficients.body:
        return (f"<section id=\"coefficients\"><h2>Merging coefficients</h2><p>The {_e(summary.method)} method merges no "
                f"weights: it runs every site model in full.</p></section>")
    if one_model_used(summary.method, coefficients.body):
        return (f"<section id=\"coefficients\"><h2>Site model used</h2><p>The {_e(summary.method)} method merges nothing: "
                f"it runs one site model as it is ({_e(result_title(summary))}).</p></section>")
    series = [("body α", coefficients.body)] + ([("head β", coefficients.head)] if summary.decoupled_head else [])
    details = summary.merge_details or {}
    scores = details.get("scores") or {}
    statistic = details.get("statistic", "")
    header = ["model", "site"] + ([f"H<sub>k</sub> ({_e(statistic)})"] if scores else []) + [_e(s) for s, _ in series]
    rows = [[_e(name), _e(model.site or "–")] + ([_number(scores.get(name))] if scores else []) +
            [_number(values[name]) for _, values in series] for name, model in zip(names, summary.models)]
    caption = "Each set of coefficients sums to 1; a lower probe uncertainty H_k gives a larger weight."
    note = "" if summary.decoupled_head else "<p class=\"note\">The head was merged with the body's coefficients α.</p>"
    return (f"<section id=\"coefficients\"><h2>Merging coefficients</h2>{_bar_chart(names, series)}{note}"
            f"{_table(header, rows, caption, text_columns=2)}</section>")


def _bar_chart(names: list[str], series: list[tuple[str, dict]], width: int = 420, bar: int = 16) -> str:
    """Grouped horizontal bars, one group per model, on a 0..1 axis (SVG)."""
    left, top, gap = max(150, 16 + 8 * max(len(name) for name in names)), 30, 14  # about 8 px per character: names are not clipped
    group = bar * len(series) + gap
    height = top + group * len(names) + 40
    grid = "".join(f"<line x1=\"{left + t * width:.1f}\" y1=\"{top - 6}\" x2=\"{left + t * width:.1f}\" y2=\"{height - 36}\" class=\"grid\"/>"
                   f"<text x=\"{left + t * width:.1f}\" y=\"{height - 22}\" text-anchor=\"middle\">{t:g}</text>" for t in (0, 0.25, 0.5, 0.75, 1))
    bars = []
    for i, name in enumerate(names):
        y = top + i * group
        bars.append(f"<text x=\"{left - 8}\" y=\"{y + bar * len(series) / 2 + 4}\" text-anchor=\"end\">{_e(name)}</text>")
        for j, (label, values) in enumerate(series):
            value = values[name]
            bars.append(f"<rect x=\"{left}\" y=\"{y + j * bar}\" width=\"{value * width:.1f}\" height=\"{bar - 2}\" "
                        f"fill=\"{SERIES_COLORS[j]}\"><title>{_e(name)} {_e(label)} {value:.3f}</title></rect>"
                        f"<text x=\"{left + value * width + 4:.1f}\" y=\"{y + j * bar + bar - 5}\" class=\"value\">{value:.3f}</text>")
    legend = "".join(f"<rect x=\"{left + k * 110}\" y=\"4\" width=\"12\" height=\"12\" fill=\"{SERIES_COLORS[k]}\"/>"
                     f"<text x=\"{left + k * 110 + 16}\" y=\"14\">{_e(label)}</text>" for k, (label, _) in enumerate(series))
    axis = f"<text x=\"{left + width / 2}\" y=\"{height - 4}\" text-anchor=\"middle\">merging coefficient (0 to 1)</text>"
    return (f"<svg class=\"chart\" width=\"{left + width + 60}\" height=\"{height}\" role=\"img\" aria-label=\"merging coefficients\">"
            f"{legend}{grid}{''.join(bars)}{axis}</svg>")


def evaluation_section(summary: RunSummary) -> str:
    """Dice and HD95 per class of the run's segmentation and of each site model's own, against the reference.

    Args:
        summary: the run's summary.

    Returns:
        An HTML section (a note when the run had no reference).
    """
    if not summary.evaluation:
        return ("<section id=\"evaluation\"><h2>Quality against the reference</h2>"
                "<p>No reference segmentation was given (<code>--reference</code>), so there is no Dice or HD95.</p></section>")
    classes = [label.name for label in summary.labels[1:]]
    header = ["segmentation", *[f"Dice {_e(c)}" for c in classes], "mean Dice", *[f"HD95 {_e(c)} (mm)" for c in classes],
              "mean HD95 (mm)"]
    entries = [(result_title(summary), summary.evaluation)]
    entries += [(name, entry.evaluation) for name, entry in (summary.per_model or {}).items() if entry.evaluation]
    best = max((e.mean_dice or 0.0) for _, e in entries)
    rows = []
    for name, evaluation in entries:
        per_class = evaluation.per_class
        mean = _number(evaluation.mean_dice)
        rows.append([_e(name), *[_number(per_class[c].dice if per_class[c].in_reference else None) for c in classes],
                     f"<b>{mean}</b>" if (evaluation.mean_dice or 0.0) == best else mean,
                     *[_number(per_class[c].hd95_mm, 1) for c in classes], _number(evaluation.mean_hd95_mm, 1)])
    return (f"<section id=\"evaluation\"><h2>Quality against the reference</h2>"
            f"{_table(header, rows, DICE_CAPTION)}"
            f"</section>")


def ranking_section(summary: RunSummary) -> str:
    """The transferability ranking table (trust as it is; fine-tune), its label sources and Kendall tau.

    Args:
        summary: the run's summary.

    Returns:
        An HTML section (a note when the run was not ranked).
    """
    ranking = summary.ranking
    if not ranking:
        return ("<section id=\"ranking\"><h2>Ranking the site models</h2>"
                "<p>Not computed for this run (<code>--rank</code>).</p></section>")
    columns = [c for c in ranking.columns if c["key"] != "model"]
    groups = {"as is": "trust as it is", "transfer": "fine-tune"}
    header = ["model"] + [f"{_e(c['title'])}<br><small>{groups.get(c['question'], '')}"
                          f"{' · ' + ('lower' if c['better'] == 'lower' else 'higher') + ' better' if c['better'] else ''}</small>"
                          for c in columns]
    rows = [[_e(row["model"]), *[str(row[c["key"]]) if isinstance(row.get(c["key"]), int) else _number(row.get(c["key"]))
                                 for c in columns]] for row in ranking.rows]
    basis = next((c["title"] for c in ranking.columns if c["key"] == ranking.as_is_basis), ranking.as_is_basis)
    questions = ranking.questions
    as_is_labels = sorted({"none (label-free)" if c["labels"] == "none" else c["labels"]
                           for c in columns if c["question"] == "as is" and c["better"]})
    caption = (f"<b>Trust as it is</b> ({_e(questions['as is'])}): rows ordered by {_e(basis)}; labels used: {_e(', '.join(as_is_labels))}. "
               f"<b>Fine-tune</b> ({_e(questions['transfer'])}): transfer rank by the fused score; labels: {_e(ranking.description)}"
               f"{' (self-referenced: the merged prediction)' if ranking.self_referenced else ''}.")
    taus = ranking.weighted_kendall_tau or {}
    titles = {c["key"]: c["title"] for c in ranking.columns}
    tau_text = "".join(f"<p class=\"note\">Weighted Kendall τ against the true Dice ({_e(variant)}): "
                       + ", ".join(f"{_e(titles.get(k, k))} {v:+.3f}" for k, v in values.items()) + "</p>" for variant, values in taus.items())
    notes = "".join(f"<p class=\"note\"><b>Note:</b> {_e(note)}</p>" for note in ranking.notes or [])
    return (f"<section id=\"ranking\"><h2>Ranking the site models</h2>{_table(header, rows, caption)}{tau_text}{notes}</section>")


def details_section(summary: RunSummary) -> str:
    """Stage timings, the site models' files and sizes, the run's notes and the library versions.

    Args:
        summary: the run's summary.

    Returns:
        An HTML section.
    """
    timings = _table(["stage", "time (s)"], [[_e(k), _number(v, 2)] for k, v in summary.timings_s.items()])
    models = _table(["model", "site", "file", "parameters"],
                    [[_e(m.name), _e(m.site or "–"), _e(m.source), f"{m.parameters:,}"] for m in summary.models], text_columns=3)
    notes = "".join(f"<li>{_e(n)}</li>" for n in summary.notes or [])
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in summary.versions.items())
    return (f"<section id=\"details\"><h2>Run details</h2><div class=\"pair\">{timings}{models}</div>"
            f"{f'<h3>Notes</h3><ul>{notes}</ul>' if notes else ''}<p class=\"note\">Versions: {versions}</p></section>")
