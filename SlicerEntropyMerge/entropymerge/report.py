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
from importlib import resources
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from .errors import UserInputError
from .figures import ENTROPY_COLORMAP, VIEW_AXES, VIEWS, CanonicalVolume, canonical, intensity_window, label_colormap, structure_slice
from .modelcard import Label, is_hex_color
from .outputs import write_text_atomically
from .progress import Progress
from .reportsections import (
    Layer,
    coefficients_section,
    details_section,
    dice_text,
    evaluation_section,
    grid_section,
    model_subtitle,
    ranking_section,
    result_title,
    run_facts,
    views_section,
)
from .summary import SUMMARY_NAME, RunSummary, output_key, read_summary
from .volume import Volume, read_label_map, read_volume

REPORT_NAME = "report.html"
MAX_PREVIEW_SIZE = 160  # voxels per axis shown; larger volumes are subsampled to keep the file small
# Screen edges (top, right, bottom, left) of each view, as figures.CanonicalVolume.slice draws it.
SCREEN_EDGES = {"axial": ("A", "L", "P", "R"), "coronal": ("S", "L", "I", "R"), "sagittal": ("S", "P", "I", "A")}
ASSETS = "report_assets"  # the page's style sheet and script (package data), inlined into every page


def write_report(run_dir: str | Path, out: str | Path | None = None, volume: str | Path | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write the HTML report of a finished run.

    Args:
        run_dir: the run's output folder.
        out: the HTML file to write (default ``run_dir/report.html``).
        volume: the target volume, replacing the path recorded in summary.json (for a volume that has moved).
        overwrite: replace an existing ``out``.
        progress: receives the ``report`` stage (default: silent).

    Returns:
        The path of the written report.

    Raises:
        UserInputError: ``out`` is not an .html file or exists, the run is not finished or wrote no
            segmentation, or a file cannot be read or written.
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
        summary.volume.path, "target volume (from summary.json; give --volume if it moved)")
    outputs = summary.outputs
    merged = read_label_map(outputs[output_key("segmentation")], target.geometry, "segmentation")
    entropy = read_volume(outputs[output_key("entropy")], "entropy map")
    layers = [Layer(result_title(summary), dice_text(summary.evaluation), merged.array)]
    for name in summary.model_names:
        key = output_key("segmentation", name)
        if key in outputs:
            labels = read_label_map(outputs[key], target.geometry, f"segmentation of {name}").array
            layers.append(Layer(name, model_subtitle(summary, name), labels))
    progress.update(0.5, "drawing the report")
    try:
        write_text_atomically(out, render_report(summary, target, entropy.array, layers))
    except OSError as error:
        raise UserInputError(f"cannot write the report {out}: {error.strerror or error}") from None
    progress.update(1.0, "report written")
    return out


def read_run_summary(run_dir: Path) -> RunSummary:
    """The summary of a complete run that wrote a segmentation.

    Args:
        run_dir: the run's output folder.

    Returns:
        The summary (``outputs``: paths in ``run_dir``).

    Raises:
        UserInputError: there is no finished run, its summary is unreadable, it wrote no segmentation
            (a ranking-only run), or a label colour is not ``#rrggbb``.
    """
    summary = read_summary(run_dir)
    if not summary.has_segmentation:
        raise UserInputError(f"the run in {run_dir} wrote no segmentation (a ranking-only run); the report needs one")
    bad = next((label for label in summary.labels if not is_hex_color(label.color)), None)
    if bad is not None:
        raise UserInputError(f"{Path(run_dir) / SUMMARY_NAME}: the label {vars(bad)!r} needs a colour written '#rrggbb'")
    return summary


def render_report(summary: RunSummary, target: Volume, entropy: np.ndarray, layers: list[Layer]) -> str:
    """The HTML page: one self-contained file (style sheet, script and images inline).

    Args:
        summary: the run's summary.
        target: the target volume (its grid is the grid of every array).
        entropy: (i, j, k) normalised entropy, 0 to 1, on ``target``'s grid.
        layers: the merged segmentation first, then site models' own; labels (i, j, k) on ``target``'s grid.

    Returns:
        The page's HTML text.
    """
    labels = tuple(Label(label.value, label.name, label.color) for label in summary.labels)
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
    name = html.escape(Path(summary.volume.path).name)
    body = "\n".join([
        f"<header><h1>EntropyMerge report: {name}</h1>{run_facts(summary)}</header>",
        views_section(labels, subsampled),
        grid_section(layers),
        coefficients_section(summary),
        evaluation_section(summary),
        ranking_section(summary),
        details_section(summary),
    ])
    # No "<", ">" or "&" in the data block: a name like "<!--<script" would end or derail it.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>EntropyMerge report: {name}</title><style>\n{asset('report.css')}</style></head>\n"
            f"<body><p id=\"status\">Loading the images…</p>\n{body}\n"
            f"<script type=\"application/json\" id=\"report-data\">{payload}</script>\n<script>\n{asset('report.js')}</script>\n</body></html>\n")


def asset(name: str) -> str:
    """The text of a file the page inlines.

    Args:
        name: ``report.css`` (the style sheet) or ``report.js`` (the script that draws the pre-oriented
            uint8 slices the page carries; see ``render_report`` for the data layout).

    Returns:
        The file's text (package data in ``report_assets``).
    """
    return (resources.files(__package__) / ASSETS / name).read_text(encoding="utf-8")


def preview(array: np.ndarray, geometry) -> CanonicalVolume:
    """What the page shows of a volume.

    Args:
        array: (i, j, k) values on ``geometry``'s grid.
        geometry: the grid of ``array``.

    Returns:
        ``array`` in canonical RAS order, subsampled to at most ``MAX_PREVIEW_SIZE`` voxels per axis
        (every n-th voxel), with its spacing (mm) scaled to match.
    """
    volume = canonical(array, geometry)
    steps = [max(1, math.ceil(n / MAX_PREVIEW_SIZE)) for n in volume.array.shape]
    return CanonicalVolume(volume.array[:: steps[0], :: steps[1], :: steps[2]],
                           tuple(s * k for s, k in zip(volume.spacing, steps)))


def packed(volume: CanonicalVolume, to_bytes) -> str:
    """A volume as the page carries it.

    Args:
        volume: the canonical volume.
        to_bytes: maps its values (float32) to 0..255; the result is rounded and clipped.

    Returns:
        Base64 text of the zlib-compressed uint8 array (C order).
    """
    values = np.clip(np.round(to_bytes(volume.array.astype(np.float32))), 0, 255).astype(np.uint8)
    return base64.b64encode(zlib.compress(values.tobytes(), 9)).decode("ascii")


def view_layout(image: CanonicalVolume, labels: CanonicalVolume, view: str) -> dict:
    """How the script finds the pixels of ``view`` in a packed array, and what they measure.

    Pixel (row r from the top, column c from the left) of slice n is element
    ``origin + n * slice_step + r * row_step + c * column_step`` of the flattened array. The steps are
    read off ``CanonicalVolume.slice`` applied to an array of element numbers, so the page shows
    exactly what the figures show. Also: slice count, aspect (height/width per pixel), mm per pixel
    (horizontal, vertical), mm between slices, and the slice to show first (through the largest structure).

    Args:
        image: the canonical preview of the target.
        labels: the canonical preview of the merged segmentation (it chooses the first slice).
        view: ``axial``, ``coronal`` or ``sagittal``.

    Returns:
        The layout as JSON-ready values (see above), with the screen edges' anatomical letters.
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
