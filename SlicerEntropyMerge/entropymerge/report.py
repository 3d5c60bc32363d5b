"""One self-contained HTML page of a finished run, to look at rather than read.

The page shows the target in axial, coronal and sagittal views with the merged segmentation and
its entropy map (with a colour bar), a slider per view, a grid of the merged and site-model
segmentations on the same slice, a bar chart of the merging coefficients, the ranking table and
the Dice / HD95 table. Everything is inline: each volume is embedded once, reoriented to RAS by
``figures.canonical``, as a zlib-compressed uint8 array that a small script slices and draws on
canvases, following ``figures.CanonicalVolume.slice`` (radiological view); charts are SVG; fonts
are the system's. The page needs no network access.
"""

from __future__ import annotations

import base64
import html
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from .errors import UserInputError
from .figures import ENTROPY_COLORMAP, ENTROPY_LABEL, VIEW_AXES, VIEWS, CanonicalVolume, canonical, intensity_window, label_colormap, structure_slice
from .modelcard import Label, is_hex_color
from .outputs import SUMMARY_NAME, write_text_atomically
from .progress import Progress
from .volume import Volume, read_label_map, read_volume

REPORT_NAME = "report.html"
MAX_PREVIEW_SIZE = 160  # voxels per axis shown; larger volumes are subsampled to keep the file small
# Screen edges (top, right, bottom, left) of each view, as figures.CanonicalVolume.slice draws it.
SCREEN_EDGES = {"axial": ("A", "L", "P", "R"), "coronal": ("S", "L", "I", "R"), "sagittal": ("S", "P", "I", "A")}
SERIES_COLORS = ("#0072b2", "#e69f00")  # body alpha, head beta (Okabe-Ito)
SINGLE_MODEL_METHODS = ("single", "select", "oracle")  # one-hot coefficients: one site model runs as it is


@dataclass
class Layer:
    """A segmentation shown in the report: the merged model's or one site model's."""

    title: str
    subtitle: str
    labels: np.ndarray  # (i, j, k) label values on the target grid


def write_report(run_dir: str | Path, out: str | Path | None = None, volume: str | Path | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` (default ``run_dir/report.html``); returns its path.

    ``volume`` replaces the target path recorded in summary.json (for a volume that has moved).
    """
    progress = progress or Progress()
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / REPORT_NAME
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserInputError(f"the report is an HTML file; give --out a name ending in .html, not {out.name}")
    if out.exists() and not overwrite:
        raise UserInputError(f"{out} already exists; choose another --out or add --overwrite")
    progress.stage("report", "writing the HTML report")
    summary = read_run_summary(run_dir)
    target = read_volume(volume, "target volume") if volume else read_volume(
        summary["volume"]["path"], "target volume (from summary.json; give --volume if it moved)")
    outputs = summary["outputs"]
    merged = read_label_map(run_dir / outputs["segmentation"], target.geometry, "segmentation")
    entropy = read_volume(run_dir / outputs["entropy"], "entropy map")
    layers = [Layer(_result_title(summary), _dice_text(summary.get("evaluation")), merged.array)]
    for model in summary["models"]:
        key = f"segmentation_{model['name']}"
        if key in outputs:
            labels = read_label_map(run_dir / outputs[key], target.geometry, f"segmentation of {model['name']}").array
            layers.append(Layer(model["name"], _model_subtitle(summary, model["name"]), labels))
    progress.update(0.5, "drawing the report")
    try:
        write_text_atomically(out, render_report(summary, target, entropy.array, layers))
    except OSError as error:
        raise UserInputError(f"cannot write the report {out}: {error.strerror or error}") from None
    progress.update(1.0, "report written")
    return out


def read_run_summary(run_dir: Path) -> dict:
    """The summary.json of a complete run (UserInputError when there is none or it is unreadable)."""
    path = run_dir / SUMMARY_NAME
    if not path.is_file():
        raise UserInputError(f"{run_dir} holds no finished run ({SUMMARY_NAME} is missing)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is not valid JSON: {error}") from None
    if "segmentation" not in summary.get("outputs", {}):
        raise UserInputError(f"the run in {run_dir} wrote no segmentation (a ranking-only run); the report needs one")
    bad = next((label for label in summary.get("labels", []) if not (isinstance(label, dict) and is_hex_color(label.get("color")))), None)
    if bad is not None:
        raise UserInputError(f"{path}: the label {bad!r} needs a colour written '#rrggbb'")
    return summary


def render_report(summary: dict, target: Volume, entropy: np.ndarray, layers: list[Layer]) -> str:
    """The HTML page; ``entropy`` and every layer's labels are (i, j, k) arrays on ``target``'s grid."""
    labels = tuple(Label(l["value"], l["name"], l["color"]) for l in summary["labels"])
    geometry = target.geometry
    image = preview(target.array, geometry)
    merged = preview(layers[0].labels, geometry)
    low, high = intensity_window(image.array)
    colors = label_colormap(labels).colors
    data = {
        "views": {view: view_layout(image, merged, view) for view in VIEWS},
        "image": packed(image, lambda a: (a - low) / (high - low) * 255),
        "entropy": packed(preview(entropy, geometry), lambda a: a * 255),
        "layers": [{"title": layer.title, "subtitle": layer.subtitle, "labels": packed(preview(layer.labels, geometry), lambda a: a)}
                   for layer in layers],
        "label_colors": [[round(c * 255) for c in color[:3]] for color in colors],
        "opacity": float(colors[-1][3]),
        "entropy_colors": (colormaps[ENTROPY_COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int).tolist(),
    }
    subsampled = max(geometry.shape) > MAX_PREVIEW_SIZE
    name = Path(summary["volume"]["path"]).name
    body = "\n".join([
        f"<header><h1>EntropyMerge report: {_e(name)}</h1>{_run_facts(summary)}</header>",
        _views_section(labels, subsampled),
        _grid_section(layers),
        _coefficients_section(summary),
        _evaluation_section(summary),
        _ranking_section(summary),
        _details_section(summary),
    ])
    # No "<", ">" or "&" in the data block: a name like "<!--<script" would end or derail it.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>EntropyMerge report: {_e(name)}</title><style>{STYLE}</style></head>\n"
            f"<body><p id=\"status\">Loading the images…</p>\n{body}\n"
            f"<script type=\"application/json\" id=\"report-data\">{payload}</script>\n<script>{SCRIPT}</script>\n</body></html>\n")


def preview(array: np.ndarray, geometry) -> CanonicalVolume:
    """``array`` in canonical RAS order, subsampled to at most MAX_PREVIEW_SIZE voxels per axis (spacing scaled)."""
    volume = canonical(array, geometry)
    steps = [max(1, math.ceil(n / MAX_PREVIEW_SIZE)) for n in volume.array.shape]
    return CanonicalVolume(volume.array[:: steps[0], :: steps[1], :: steps[2]],
                           tuple(s * k for s, k in zip(volume.spacing, steps)))


def packed(volume: CanonicalVolume, to_bytes) -> str:
    """Base64 of the zlib-compressed uint8 array (C order); ``to_bytes`` maps the values to 0..255."""
    values = np.clip(np.round(to_bytes(volume.array.astype(np.float32))), 0, 255).astype(np.uint8)
    return base64.b64encode(zlib.compress(values.tobytes(), 9)).decode("ascii")


def view_layout(image: CanonicalVolume, labels: CanonicalVolume, view: str) -> dict:
    """How the script finds the pixels of ``view`` in a packed array, and what they measure.

    Pixel (row r from the top, column c from the left) of slice n is element
    ``origin + n * slice_step + r * row_step + c * column_step`` of the flattened array. The steps are
    read off ``CanonicalVolume.slice`` applied to an array of element numbers, so the page shows
    exactly what the figures show. Also: slice count, aspect (height/width per pixel), mm per pixel
    (horizontal, vertical), mm between slices, and the slice to show first (through the largest structure).
    """
    numbers = CanonicalVolume(np.arange(image.array.size).reshape(image.array.shape), image.spacing)
    first, aspect = numbers.slice(view, 0)
    first = np.flipud(first)  # slice() is drawn with origin="lower"; a canvas starts at the top
    second = np.flipud(numbers.slice(view, 1)[0])
    axis = VIEW_AXES[view]
    horizontal, vertical = [s for a, s in enumerate(image.spacing) if a != axis]
    return {"count": image.array.shape[axis], "rows": first.shape[0], "columns": first.shape[1], "aspect": aspect,
            "origin": int(first[0, 0]), "slice_step": int(second[0, 0] - first[0, 0]),
            "row_step": int(first[1, 0] - first[0, 0]), "column_step": int(first[0, 1] - first[0, 0]),
            "pixel_mm": [horizontal, vertical], "slice_mm": image.spacing[axis],
            "start": structure_slice(labels, view), "edges": SCREEN_EDGES[view]}


# ---------------------------------------------------------------------------------------------
# Sections


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _result_title(summary: dict) -> str:
    """What produced the run's segmentation: the merged model, or the one site model that ran."""
    body = (summary.get("coefficients") or {}).get("body")
    if summary["method"] in SINGLE_MODEL_METHODS and body:
        return f"{summary['method']}: {max(body, key=body.get)}"
    return f"merged ({summary['method']})"


def _dice_text(evaluation: dict | None) -> str:
    return f"mean Dice {evaluation['mean_dice']:.3f}" if evaluation and evaluation.get("mean_dice") is not None else ""


def _model_subtitle(summary: dict, name: str) -> str:
    coefficients = summary["coefficients"]
    shown = (("body", "α"), ("head", "β")) if summary.get("decoupled_head") else (("body", "α"),)
    parts = [f"{symbol} {coefficients[key][name]:.3f}" for key, symbol in shown if coefficients.get(key)]
    evaluation = ((summary.get("per_model") or {}).get(name) or {}).get("evaluation")
    return " · ".join(parts + ([_dice_text(evaluation)] if evaluation else []))


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


def _run_facts(summary: dict) -> str:
    models = ", ".join(_e(m["name"]) for m in summary["models"])
    return (f"<p class=\"facts\"><b>Method</b> {_e(summary['method'])} · <b>site models</b> {models} · "
            f"<b>device</b> {_e(summary['device'])} · <b>created</b> {_e(summary['created'])}<br>"
            f"<b>Target</b> {_e(summary['volume']['path'])}: {_e(summary['volume']['geometry'])}</p>")


def _views_section(labels: tuple[Label, ...], subsampled: bool) -> str:
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


def _grid_section(layers: list[Layer]) -> str:
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


def _coefficients_section(summary: dict) -> str:
    coefficients = summary["coefficients"]
    names = [m["name"] for m in summary["models"]]
    if not coefficients.get("body"):
        return (f"<section id=\"coefficients\"><h2>Merging coefficients</h2><p>The {_e(summary['method'])} method merges no "
                f"weights: it runs every site model in full.</p></section>")
    if summary["method"] in SINGLE_MODEL_METHODS:
        return (f"<section id=\"coefficients\"><h2>Site model used</h2><p>The {_e(summary['method'])} method merges nothing: "
                f"it runs one site model as it is ({_e(_result_title(summary))}).</p></section>")
    series = [("body α", coefficients["body"])] + ([("head β", coefficients["head"])] if summary.get("decoupled_head") else [])
    details = summary.get("merge_details") or {}
    scores = details.get("scores") or {}
    statistic = details.get("statistic", "")
    header = ["model", "site"] + ([f"H<sub>k</sub> ({_e(statistic)})"] if scores else []) + [_e(s) for s, _ in series]
    rows = [[_e(name), _e(model["site"] or "–")] + ([_number(scores.get(name))] if scores else []) +
            [_number(values[name]) for _, values in series] for name, model in zip(names, summary["models"])]
    caption = "Each set of coefficients sums to 1; a lower probe uncertainty H_k gives a larger weight."
    note = "" if summary.get("decoupled_head") else "<p class=\"note\">The head was merged with the body's coefficients α.</p>"
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


def _evaluation_section(summary: dict) -> str:
    if not summary.get("evaluation"):
        return ("<section id=\"evaluation\"><h2>Quality against the reference</h2>"
                "<p>No reference segmentation was given (<code>--reference</code>), so there is no Dice or HD95.</p></section>")
    classes = [l["name"] for l in summary["labels"][1:]]
    header = ["segmentation", *[f"Dice {_e(c)}" for c in classes], "mean Dice", *[f"HD95 {_e(c)} (mm)" for c in classes],
              "mean HD95 (mm)"]
    entries = [(_result_title(summary), summary["evaluation"])]
    entries += [(name, entry["evaluation"]) for name, entry in (summary.get("per_model") or {}).items() if entry.get("evaluation")]
    best = max((e["mean_dice"] or 0.0) for _, e in entries)
    rows = []
    for name, evaluation in entries:
        per_class = evaluation["per_class"]
        mean = _number(evaluation["mean_dice"])
        rows.append([_e(name), *[_number(per_class[c]["dice"] if per_class[c].get("in_reference", True) else None) for c in classes],
                     f"<b>{mean}</b>" if (evaluation["mean_dice"] or 0.0) == best else mean,
                     *[_number(per_class[c]["hd95_mm"], 1) for c in classes], _number(evaluation["mean_hd95_mm"], 1)])
    return (f"<section id=\"evaluation\"><h2>Quality against the reference</h2>"
            f"{_table(header, rows, DICE_CAPTION)}"
            f"</section>")


def _ranking_section(summary: dict) -> str:
    ranking = summary.get("ranking")
    if not ranking:
        return ("<section id=\"ranking\"><h2>Ranking the site models</h2>"
                "<p>Not computed for this run (<code>--rank</code>).</p></section>")
    columns = [c for c in ranking["columns"] if c["key"] != "model"]
    groups = {"as is": "trust as it is", "transfer": "fine-tune"}
    header = ["model"] + [f"{_e(c['title'])}<br><small>{groups.get(c['question'], '')}"
                          f"{' · ' + ('lower' if c['better'] == 'lower' else 'higher') + ' better' if c['better'] else ''}</small>"
                          for c in columns]
    rows = [[_e(row["model"]), *[str(row[c["key"]]) if isinstance(row.get(c["key"]), int) else _number(row.get(c["key"]))
                                 for c in columns]] for row in ranking["rows"]]
    basis = next((c["title"] for c in ranking["columns"] if c["key"] == ranking["as_is_basis"]), ranking["as_is_basis"])
    questions = ranking["questions"]
    as_is_labels = sorted({"none (label-free)" if c["labels"] == "none" else c["labels"]
                           for c in columns if c["question"] == "as is" and c["better"]})
    caption = (f"<b>Trust as it is</b> ({_e(questions['as is'])}): rows ordered by {_e(basis)}; labels used: {_e(', '.join(as_is_labels))}. "
               f"<b>Fine-tune</b> ({_e(questions['transfer'])}): transfer rank by the fused score; labels: {_e(ranking['description'])}"
               f"{' (self-referenced: the merged prediction)' if ranking['self_referenced'] else ''}.")
    taus = ranking.get("weighted_kendall_tau") or {}
    titles = {c["key"]: c["title"] for c in ranking["columns"]}
    tau_text = "".join(f"<p class=\"note\">Weighted Kendall τ against the true Dice ({_e(variant)}): "
                       + ", ".join(f"{_e(titles.get(k, k))} {v:+.3f}" for k, v in values.items()) + "</p>" for variant, values in taus.items())
    notes = "".join(f"<p class=\"note\"><b>Note:</b> {_e(note)}</p>" for note in ranking.get("notes") or [])
    return (f"<section id=\"ranking\"><h2>Ranking the site models</h2>{_table(header, rows, caption)}{tau_text}{notes}</section>")


def _details_section(summary: dict) -> str:
    timings = _table(["stage", "time (s)"], [[_e(k), _number(v, 2)] for k, v in summary["timings_s"].items()])
    models = _table(["model", "site", "file", "parameters"],
                    [[_e(m["name"]), _e(m["site"] or "–"), _e(m["source"]), f"{m['parameters']:,}"] for m in summary["models"]], text_columns=3)
    notes = "".join(f"<li>{_e(n)}</li>" for n in summary.get("notes") or [])
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in summary["versions"].items())
    return (f"<section id=\"details\"><h2>Run details</h2><div class=\"pair\">{timings}{models}</div>"
            f"{f'<h3>Notes</h3><ul>{notes}</ul>' if notes else ''}<p class=\"note\">Versions: {versions}</p></section>")


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 0 auto;
       max-width: 1240px; padding: 0 20px 40px; color: #1a1a1a; background: #fafafa; font-size: 15px; }
h1 { font-size: 24px; margin: 20px 0 6px; } h2 { font-size: 19px; margin: 0 0 10px; } h3 { font-size: 15px; margin: 4px 0; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 14px 18px; margin: 16px 0; }
.facts, .note { color: #444; font-size: 13px; } .controls { font-size: 14px; }
.views { display: flex; gap: 18px; flex-wrap: wrap; } .view { display: flex; flex-direction: column; align-items: center; }
.frame { position: relative; background: #000; margin: 4px 0; line-height: 0; padding: 14px;
         display: flex; align-items: center; justify-content: center; } .cell .frame { padding: 4px; }
canvas { display: block; }
.edge { position: absolute; color: #ffd84d; font: bold 12px system-ui, sans-serif; line-height: 1; }
.edge.top { top: 1px; left: 50%; transform: translateX(-50%); } .edge.bottom { bottom: 1px; left: 50%; transform: translateX(-50%); }
.edge.left { left: 2px; top: 50%; transform: translateY(-50%); } .edge.right { right: 2px; top: 50%; transform: translateY(-50%); }
.scale { position: absolute; right: 16px; bottom: 16px; border-bottom: 2px solid #fff; color: #fff; font: 11px system-ui, sans-serif;
         line-height: 1.2; text-align: center; }
.pixel { margin: 0; font-size: 12px; color: #555; } input[type=range] { width: 260px; } output { font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555; margin: 0 4px 0 10px; vertical-align: -1px; }
.cells { display: flex; gap: 12px; flex-wrap: wrap; } .cell { margin: 0; text-align: center; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
caption { caption-side: bottom; text-align: left; font-size: 12px; color: #555; padding-top: 4px; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 10px; text-align: left; } .n { text-align: right; }
th { background: #f1f1f1; } .pair { display: flex; gap: 30px; flex-wrap: wrap; align-items: flex-start; }
svg text { font: 13px system-ui, sans-serif; fill: #222; } svg .grid { stroke: #ddd; } svg .value { font-size: 11px; }
#status { color: #a00; font-size: 13px; min-height: 1em; }
"""

# Draws the pre-oriented uint8 slices the page carries (see render_report for the data layout).
SCRIPT = """
"use strict";
const report = JSON.parse(document.getElementById("report-data").textContent);
const VIEWS = Object.keys(report.views);
const settings = { overlay: true, opacity: report.opacity };

async function inflate(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// Draw slice `index` of `view` centred in a `box` px square: the scan with `labels`, or the entropy map.
function draw(canvas, view, index, box, image, labels, entropy) {
  const v = report.views[view], start = v.origin + index * v.slice_step;
  const zoom = Math.min(box / v.columns, box / (v.rows * v.aspect));
  canvas.parentElement.style.width = canvas.parentElement.style.height = `${box}px`;
  canvas.width = v.columns;
  canvas.height = v.rows;
  canvas.style.width = `${Math.round(v.columns * zoom)}px`;
  canvas.style.height = `${Math.round(v.rows * v.aspect * zoom)}px`;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(v.columns, v.rows);
  const out = pixels.data, a = settings.opacity;
  for (let row = 0, p = 0; row < v.rows; row++) {
    for (let column = 0; column < v.columns; column++, p += 4) {
      const voxel = start + row * v.row_step + column * v.column_step;
      let r, g, b;
      if (entropy) {
        [r, g, b] = report.entropy_colors[entropy[voxel]];
      } else {
        r = g = b = image[voxel];
        const label = labels && settings.overlay ? labels[voxel] : 0;
        if (label > 0) {
          const c = report.label_colors[label];
          r += (c[0] - r) * a; g += (c[1] - g) * a; b += (c[2] - b) * a;
        }
      }
      out[p] = r; out[p + 1] = g; out[p + 2] = b; out[p + 3] = 255;
    }
  }
  context.putImageData(pixels, 0, 0);
  return zoom;
}

function sliceText(view, index) {
  const v = report.views[view];
  return `slice ${index + 1} of ${v.count} (${v.slice_mm.toFixed(1)} mm apart)`;
}

function scaleBar(element, view, zoom) {
  const mmPerPixel = report.views[view].pixel_mm[0] / zoom;
  const length = [5, 10, 20, 50, 100, 200].filter((mm) => mm / mmPerPixel <= 90).pop() || 5;
  element.style.width = `${Math.round(length / mmPerPixel)}px`;
  element.textContent = `${length} mm`;
}

async function main() {
  if (typeof DecompressionStream === "undefined") {
    throw new Error("this browser cannot unpack the report's images (it needs Compression Streams: Chrome 80+, Firefox 113+, Safari 16.4+)");
  }
  const image = await inflate(report.image);
  const entropy = await inflate(report.entropy);
  const layers = [];
  for (const layer of report.layers) layers.push(await inflate(layer.labels));

  const slider = (view) => document.getElementById(`slice-${view}`);
  function drawView(view) {
    const index = Number(slider(view).value);
    const zoom = draw(document.querySelector(`canvas[data-role=overlay][data-view=${view}]`), view, index, 300, image, layers[0], null);
    draw(document.querySelector(`canvas[data-role=entropy][data-view=${view}]`), view, index, 300, image, null, entropy);
    document.getElementById(`slice-${view}-text`).textContent = sliceText(view, index);
    scaleBar(document.querySelector(`.scale[data-view=${view}]`), view, zoom);
  }
  for (const view of VIEWS) {
    const v = report.views[view];
    slider(view).max = v.count - 1;
    slider(view).value = v.start;
    slider(view).addEventListener("input", () => drawView(view));
    document.querySelectorAll(`.edge[data-view=${view}]`).forEach((e) => { e.textContent = v.edges[Number(e.dataset.edge)]; });
    document.querySelector(`.pixel[data-view=${view}]`).textContent = `pixels ${v.pixel_mm[0].toFixed(2)} × ${v.pixel_mm[1].toFixed(2)} mm`;
    drawView(view);
  }

  const gridSlider = document.getElementById("grid-slice");
  const gridView = () => document.querySelector("input[name=grid-view]:checked").value;
  function drawGrid() {
    const view = gridView(), index = Number(gridSlider.value);
    layers.forEach((labels, i) => draw(document.querySelector(`canvas[data-layer="${i}"]`), view, index, 200, image, labels, null));
    document.getElementById("grid-slice-text").textContent = `${view} ${sliceText(view, index)}`;
  }
  function chooseGridView() {
    const v = report.views[gridView()];
    gridSlider.max = v.count - 1;
    gridSlider.value = v.start;
    drawGrid();
  }
  document.querySelectorAll("input[name=grid-view]").forEach((radio) => radio.addEventListener("change", chooseGridView));
  gridSlider.addEventListener("input", drawGrid);
  chooseGridView();

  const redrawAll = () => { VIEWS.forEach(drawView); drawGrid(); };
  const opacity = document.getElementById("opacity");
  opacity.value = settings.opacity;
  opacity.addEventListener("input", () => { settings.opacity = Number(opacity.value); redrawAll(); });
  document.getElementById("show-overlay").addEventListener("change", (event) => { settings.overlay = event.target.checked; redrawAll(); });
  document.getElementById("status").remove();
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  document.getElementById("status").textContent = `The images could not be shown: ${error.message}`;
  console.error(error);
});
"""
