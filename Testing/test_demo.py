"""``entropymerge demo`` on the bundled sample: every method, tables, files on the targets' grids, the figure."""

import json

import nibabel
import numpy as np
from matplotlib.image import imread

from entropymerge.cli import main
from entropymerge.sampledata import bundled_models, bundled_targets

METHOD_ROWS = ("site model", "ensemble", "mean merge", "entropy-adaptive merge (decoupled head)",
               "entropy-adaptive merge (head not decoupled)", "entropy-selected model", "oracle best single")


def test_bundled_assets_are_small_and_complete():
    models = sorted(p.name for p in bundled_models("dropgen").iterdir())
    assert [m for m in models if m.endswith(".json")] == ["harbour-ct.json", "riverside-t1.json", "summit-pd.json", "valley-t2.json"]
    assert sorted(p.name for p in bundled_models("heterogeneous").iterdir()) == ["northgate-t2.json", "northgate-t2.safetensors"]
    assert [t.name for t in bundled_targets()] == ["lowfield-t1", "t2-fatsat"]
    samples = bundled_models("dropgen").parents[1]
    total = sum(p.stat().st_size for p in samples.rglob("*") if p.is_file())
    assert total < 15_000_000, f"bundled sample assets take {total / 1e6:.1f} MB"


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    for target in ("lowfield-t1", "t2-fatsat"):
        section = printed.split(f"=== target {target}")[1].split("=== target")[0]
        for row in METHOD_ROWS:
            assert row in section, f"{row} missing from the {target} table"
        assert "merge coefficients (adaptive)" in section and "body" in section and "head" in section
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for target in bundled_targets():
        methods = {m["key"]: m for m in summary["targets"][target.name]["methods"]}
        assert {"mean", "adaptive", "adaptive-coupled", "ensemble", "select", "oracle"} <= set(methods)
        for method in methods.values():
            assert 0.0 <= method["evaluation"]["mean_dice"] <= 1.0 and method["seconds"] > 0
        oracle = methods["oracle"]["evaluation"]["mean_dice"]
        assert oracle == max(m["evaluation"]["mean_dice"] for k, m in methods.items() if k.startswith("site:"))
        reference = nibabel.load(str(target.image))
        for name in ("segmentation_adaptive", "segmentation_mean", "entropy_adaptive"):
            written = nibabel.load(str(out / target.name / f"{name}.nii.gz"))
            assert written.shape == reference.shape
            np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    figure = imread(out / "demo.png")
    assert figure.shape[0] > 600 and figure.shape[1] > 1200


def test_figure_slice_is_where_the_two_merges_differ_most():
    from entropymerge.figures import CanonicalVolume, most_different_slice

    truth = np.zeros((8, 8, 10), np.uint8)
    truth[2:6, 2:6, 7] = 1  # the busiest slice of the truth is 7
    first, second = truth.copy(), truth.copy()
    second[1:7, 1:7, 3] = 2  # the merges disagree most on slice 3
    second[0, 0, 5] = 1
    volumes = [CanonicalVolume(a, (1.0, 1.0, 1.0)) for a in (first, second, truth)]
    assert most_different_slice(*volumes) == 3
    assert most_different_slice(volumes[0], volumes[0], volumes[2]) == 7  # they agree: the busiest slice
