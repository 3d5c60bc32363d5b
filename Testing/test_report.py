"""The HTML report: what it holds (checked in the file and in a real headless Chromium), and the report command."""

import base64
import json
import re
import shutil
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from browser import browser_context, missing_reason, open_report
from conftest import SAMPLE_LABELS_MODEL, shared_file, write_tiny_model
from entropymerge.cli import main
from entropymerge.figures import VIEWS, canonical
from entropymerge.pipeline import run
from entropymerge.report import MAX_PREVIEW_SIZE, preview
from entropymerge.sampledata import site, write_case
from entropymerge.settings import RunOptions
from entropymerge.volume import read_volume, write_volume

CANVAS_PIXELS = """selector => {
  const canvas = document.querySelector(selector);
  return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
}"""


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    """A small anisotropic scan stored RSA (thick coronal slices), its labels, and two tiny 4-class site models."""
    folder = tmp_path_factory.mktemp("report")
    image, labels = write_case(replace(site("lowfield-t1"), spacing=(3.0, 3.0, 6.0)), 960100, folder / "case")
    models = [write_tiny_model(folder / "models", name, seed, **SAMPLE_LABELS_MODEL)
              for seed, name in enumerate(("north", "south"))]
    return image, labels, models, folder


@pytest.fixture(scope="module")
def full_run(tiny_case):
    """``run --per-model --rank --reference --report``: the report has every section filled."""
    image, labels, models, folder = tiny_case
    return run(RunOptions(volume=image, models=models, out=folder / "full", reference=labels, per_model=True, rank=True,
                          report=True, device="cpu"))


def embedded_data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1))


def unpacked(text: str, shape) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8).reshape(shape)


def test_run_report_shows_the_whole_run(full_run):
    report = Path(full_run.outputs["report"])
    assert report == Path(full_run.outputs["summary"]).with_name("report.html")
    html = report.read_text(encoding="utf-8")
    size = len(html.encode())
    print(f"report of a {read_volume(full_run.volume.path).geometry.shape} case with 2 site models: {size / 1e3:.0f} kB")
    assert size < 500_000
    assert "http://" not in html and "https://" not in html and not re.search(r"\b(?:src|href)\s*=", html), "nothing may load from elsewhere"
    for label in full_run.labels[1:]:
        assert f"{label.color}\"></span>{label.name}" in html, "the legend names each label with its colour"
    chart = html.split('id="coefficients"')[1].split("</section>")[0]
    for key in ("body", "head"):
        for model, value in getattr(full_run.coefficients, key).items():
            assert f"{model} {'body α' if key == 'body' else 'head β'} {value:.3f}" in chart
    evaluation = html.split('id="evaluation"')[1].split("</section>")[0]
    assert f"{full_run.evaluation.mean_dice:.3f}" in evaluation
    assert f"HD95 {full_run.labels[1].name} (mm)" in evaluation
    for name in ("north", "south"):
        assert f"{full_run.per_model[name].evaluation.mean_dice:.3f}" in evaluation
    ranking = html.split('id="ranking"')[1].split("</section>")[0]
    ranked = [row["model"] for row in full_run.ranking.rows]
    assert sorted(ranked, key=ranking.index) == ranked, "the ranking table keeps the ranking's order"

    data = embedded_data(html)
    assert [layer["title"] for layer in data["layers"]] == ["merged (adaptive)", "north", "south"]
    geometry = read_volume(full_run.volume.path).geometry
    for layer, file in zip(data["layers"], ("segmentation", "segmentation_north", "segmentation_south")):
        expected = canonical(read_volume(full_run.outputs[file]).array, geometry)
        labels = unpacked(layer["labels"], expected.array.shape)
        np.testing.assert_array_equal(labels, expected.array)
    merged = canonical(read_volume(full_run.outputs["segmentation"]).array, geometry)
    for view in VIEWS:  # the script's indexing draws exactly the slice the figures draw
        layout = data["views"][view]
        expected, aspect = merged.slice(view, layout["start"])
        rows, columns = np.mgrid[0 : layout["rows"], 0 : layout["columns"]]
        index = layout["origin"] + layout["start"] * layout["slice_step"] + rows * layout["row_step"] + columns * layout["column_step"]
        np.testing.assert_array_equal(merged.array.ravel()[index], np.flipud(expected))
        assert layout["aspect"] == pytest.approx(aspect)
        assert layout["pixel_mm"][1] / layout["pixel_mm"][0] == pytest.approx(aspect)
    assert sorted(data["views"]["coronal"]["pixel_mm"] + [data["views"]["coronal"]["slice_mm"]]) == [3.0, 3.0, 6.0]


def test_report_in_a_real_browser(full_run, tmp_path):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    report = Path(full_run.outputs["report"])
    data = embedded_data(report.read_text(encoding="utf-8"))
    geometry = read_volume(full_run.volume.path).geometry
    entropy = canonical(read_volume(full_run.outputs["entropy"]).array, geometry)
    colours = np.array(data["entropy_colors"])
    with browser_context() as context:
        page, errors, requests = open_report(context, report)
        for view in VIEWS:  # every entropy pixel on screen is the figures' slice in the entropy colour map
            layout = data["views"][view]
            shown = np.array(page.evaluate(CANVAS_PIXELS, f"canvas[data-role=entropy][data-view={view}]"))
            shown = shown.reshape(layout["rows"], layout["columns"], 4)[..., :3]
            plane = np.flipud(entropy.slice(view, layout["start"])[0]).astype(np.float32)
            np.testing.assert_array_equal(shown, colours[np.clip(np.round(plane * 255), 0, 255).astype(int)])

        overlay = page.locator("canvas[data-role=overlay][data-view=axial]")
        slider, caption = page.locator("#slice-axial"), page.locator("#slice-axial-text")
        before, before_caption, start = overlay.evaluate("c => c.toDataURL()"), caption.inner_text(), slider.input_value()
        assert before_caption == f"slice {int(start) + 1} of {data['views']['axial']['count']} (" + \
            f"{data['views']['axial']['slice_mm']:.1f} mm apart)"
        slider.focus()
        page.keyboard.press("Home" if int(start) > 0 else "End")  # the keyboard moves a range input, as a user would
        assert slider.input_value() != start
        assert caption.inner_text() != before_caption
        assert overlay.evaluate("c => c.toDataURL()") != before, "moving the slider shows another slice"

        page.uncheck("#show-overlay")
        assert overlay.evaluate("c => c.toDataURL()") != before
        page.check("input[name=grid-view][value=coronal]")
        assert page.locator("#grid-slice").get_attribute("max") == str(data["views"]["coronal"]["count"] - 1)
        assert page.locator("#grid-slice-text").inner_text().startswith("coronal slice")
        assert page.locator("canvas[data-layer]").count() == 3
        page.screenshot(path=tmp_path / "report.png", full_page=True)
    assert errors == [], f"console errors: {errors}"
    assert all(url.startswith(("file:", "data:")) for url in requests), f"network requests: {requests}"
    screenshot = imread(tmp_path / "report.png")
    print(f"screenshot: {tmp_path / 'report.png'} {screenshot.shape}")
    assert screenshot.shape[1] == 1280 and screenshot.shape[0] > 1500


def test_report_command(tiny_case, tmp_path, capsys):
    image, _, models, _ = tiny_case
    scan = shutil.copy(image, tmp_path / "scan.nii.gz")
    out = tmp_path / "run"
    assert main(["run", "--volume", str(scan), "--model", str(models[0]), "--model", str(models[1]), "--method", "mean",
                 "--out", str(out), "--device", "cpu", "--progress", "none"]) == 0
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "were not computed for this run" in html and "<code>--per-model</code>" in html
    assert "No reference segmentation was given" in html and "Not computed for this run" in html
    assert len(embedded_data(html)["layers"]) == 1
    assert "north body α 0.500" in html, "the mean merge's coefficients are charted"
    capsys.readouterr()

    def fails(*args: str, message: str):
        assert main(["report", *args]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error

    fails(str(out), message="already exists; choose another --out or add --overwrite")
    fails(str(out), "--out", str(tmp_path / "report.txt"), message="give --out a name ending in .html")
    fails(str(tmp_path / "nowhere"), message="holds no finished run")
    Path(scan).rename(tmp_path / "moved.nii.gz")
    fails(str(out), "--out", str(tmp_path / "other.html"), message="give --volume if it moved")
    assert main(["report", str(out), "--out", str(tmp_path / "other.html"), "--volume", str(tmp_path / "moved.nii.gz")]) == 0
    assert (tmp_path / "other.html").stat().st_size > 10_000


def test_large_volumes_are_shown_subsampled():
    volume = read_volume(shared_file("spleen_msd_ct_ivadomed/sub-spleen2_ct.nii.gz"))  # 164 x 166 x 26 voxels
    full = canonical(volume.array, volume.geometry)
    shown = preview(volume.array, volume.geometry)
    steps = [2 if n > MAX_PREVIEW_SIZE else 1 for n in full.array.shape]
    assert max(shown.array.shape) <= MAX_PREVIEW_SIZE and steps.count(2) == 2
    np.testing.assert_array_equal(shown.array, full.array[:: steps[0], :: steps[1], :: steps[2]])
    assert shown.spacing == pytest.approx([s * k for s, k in zip(full.spacing, steps)])


def test_single_model_run_without_a_site_and_a_class_missing_from_the_reference(tiny_case, tmp_path):
    """The rough spots seen on a real bundle: no merging section or merged-head note for one model, a dash for a
    missing site, a long name not clipped, and a class absent from the reference gets no Dice (like its HD95)."""
    image, labels, _, folder = tiny_case
    long_name = "Segmentation Template of a clinic"
    models = [write_tiny_model(tmp_path / "models", name, seed, site=None, **SAMPLE_LABELS_MODEL)
              for seed, name in enumerate((long_name, "south"))]
    reference = read_volume(labels)
    without_lesion = np.where(reference.array == 3, 0, reference.array).astype(np.uint8)
    reference_path = write_volume(without_lesion, reference.geometry, tmp_path / "reference.nii.gz")
    summary = run(RunOptions(volume=image, models=models, out=tmp_path / "single", method="single", single_model="south",
                             reference=reference_path, report=True, device="cpu"))
    html = Path(summary.outputs["report"]).read_text(encoding="utf-8")
    coefficients = html.split('id="coefficients"')[1].split("</section>")[0]
    assert "Site model used" in coefficients and "runs one site model as it is (single: south)" in coefficients
    assert "head was merged" not in html and "<svg" not in coefficients
    assert embedded_data(html)["layers"][0]["title"] == "single: south"
    evaluation = html.split('id="evaluation"')[1].split("</section>")[0]
    lesion = summary.labels[3].name
    assert summary.evaluation.per_class[lesion].in_reference is False
    row = evaluation.split("<tbody>")[1].split("</tr>")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[3] == "–" and cells[7] == "–", f"a class missing from the reference has neither Dice nor HD95: {cells}"
    details = html.split('id="details"')[1].split("</section>")[0]
    assert ">None<" not in html and f"<td>{long_name}</td><td>–</td>" in details

    mean = run(RunOptions(volume=image, models=models, out=tmp_path / "mean", method="mean", report=True, device="cpu"))
    chart = Path(mean.outputs["report"]).read_text(encoding="utf-8").split('id="coefficients"')[1].split("</svg>")[0]
    label_x = float(re.search(rf'<text x="([0-9.]+)" y="[0-9.]+" text-anchor="end">{long_name}</text>', chart).group(1))
    assert label_x >= 8 * len(long_name), "the name column is wide enough for the longest name"


def test_views_open_through_the_largest_structure_not_on_stray_voxels():
    from entropymerge.figures import CanonicalVolume, structure_slice

    labels = np.zeros((40, 40, 20), np.uint8)
    labels[15:25, 15:25, 8:13] = 1  # the structure: at most 100 voxels per axial slice
    labels[::2, ::2, 2] = 2  # 400 scattered stray voxels on one edge slice
    volume = CanonicalVolume(labels, (1.0, 1.0, 1.0))
    assert structure_slice(volume, "axial") == 10 and structure_slice(volume, "sagittal") == 20
    assert structure_slice(CanonicalVolume(np.zeros((4, 6, 8), np.uint8), (1.0, 1.0, 1.0)), "axial") == 4
