"""Every method and baseline through ``entropymerge run``: coefficients, statistics, metrics, bad options."""

import json

import nibabel
import numpy as np
import pytest

from conftest import shared_file
from entropymerge.cli import main
from entropymerge.metrics import dice, evaluate, hd95_mm
from entropymerge.modelcard import default_labels
from entropymerge.volume import Geometry, write_volume


def run(tmp_path, *args) -> dict:
    out = tmp_path / "out"
    code = main(["run", *map(str, args), "--out", str(out), "--progress", "none", "--feature-cache", str(tmp_path / "cache")])
    assert code == 0
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("method", ["adaptive", "mean", "ensemble", "single", "select", "oracle"])
def test_every_method_in_one_code_path(tmp_path, mind_models, sphere_case, method):
    image, labels = sphere_case
    extra = ["--single-model", "site1"] if method == "single" else []
    summary = run(tmp_path, "--volume", image, "--model", mind_models, "--method", method, "--reference", labels, *extra)
    assert summary["method"] == method
    assert summary["evaluation"]["classes_in_reference"] == ["structure 1", "structure 2"]
    assert 0.0 <= summary["evaluation"]["mean_dice"] <= 1.0
    body = summary["coefficients"]["body"]
    if method == "adaptive":
        assert summary["decoupled_head"] is True
        assert set(summary["probe_statistics"]["entropy"]) == {"site0", "site1", "site2"}
        assert sum(body.values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(summary["coefficients"]["head"].values()) == pytest.approx(1.0, abs=1e-5)
        assert summary["merge_details"]["probe"]["patches"] == 8
        assert {"probe", "merge", "features"} <= set(summary["timings_s"])
    elif method == "mean":
        assert body == {"site0": pytest.approx(1 / 3), "site1": pytest.approx(1 / 3), "site2": pytest.approx(1 / 3)}
    elif method == "single":
        assert body == {"site0": 0.0, "site1": 1.0, "site2": 0.0}
    elif method == "select":
        scores = summary["merge_details"]["scores"]
        assert body[min(scores, key=scores.get)] == 1.0
    elif method == "ensemble":
        assert body is None and len(summary["per_model"]) == 3
    elif method == "oracle":
        dices = {name: entry["evaluation"]["mean_dice"] for name, entry in summary["per_model"].items()}
        assert body[max(dices, key=dices.get)] == 1.0
        assert summary["evaluation"]["mean_dice"] == pytest.approx(max(dices.values()))


def test_per_model_outputs_and_feature_cache(tmp_path, mind_models, sphere_case):
    image, _ = sphere_case
    first = run(tmp_path / "a", "--volume", image, "--model", mind_models, "--per-model")
    assert first["features"]["from_cache"] is False
    for name in ("site0", "site1", "site2"):
        assert (tmp_path / "a" / "out" / f"segmentation_{name}.nii.gz").exists()
        assert (tmp_path / "a" / "out" / f"entropy_{name}.nii.gz").exists()
    # same cache folder: the second run skips the feature stage and gives the same result
    second_out = tmp_path / "b"
    code = main(["run", "--volume", str(image), "--model", str(mind_models), "--out", str(second_out), "--progress", "none",
                 "--feature-cache", str(tmp_path / "a" / "cache")])
    assert code == 0
    second = json.loads((second_out / "summary.json").read_text(encoding="utf-8"))
    assert second["features"]["from_cache"] is True
    assert second["coefficients"] == first["coefficients"]
    read = lambda p: np.asanyarray(nibabel.load(str(p)).dataobj)
    np.testing.assert_array_equal(read(second_out / "segmentation.nii.gz"), read(tmp_path / "a" / "out" / "segmentation.nii.gz"))


def test_adaptive_on_a_real_volume_records_alpha_beta_and_entropies(tmp_path, mind_models):
    volume = shared_file("abdomen_totalseg_ct_mr/example_mr_sm.nii.gz")
    summary = run(tmp_path, "--volume", volume, "--model", mind_models, "--method", "adaptive")
    for key in ("body", "head"):
        assert set(summary["coefficients"][key]) == {"site0", "site1", "site2"}
    assert all(0 <= h <= 1 for h in summary["probe_statistics"]["entropy"].values())
    assert summary["merge_details"]["head_module"] == "model.2"
    out = nibabel.load(str(tmp_path / "out" / "segmentation.nii.gz"))
    assert out.shape == nibabel.load(str(volume)).shape
    np.testing.assert_allclose(out.affine, nibabel.load(str(volume)).affine, atol=1e-5)


def failing(tmp_path, capsys, *args) -> str:
    code = main(["run", *map(str, args), "--out", str(tmp_path / "out"), "--progress", "none"])
    error = capsys.readouterr().err
    assert code == 2, error
    return error


def test_bad_method_options(tmp_path, capsys, mind_models, sphere_case):
    image, labels = sphere_case
    assert "--temperature must be > 0, got 0.0" in failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--temperature", "0")
    assert "--head-temperature must be > 0" in failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--head-temperature", "-1")
    assert "needs --reference" in failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--method", "oracle")
    assert "trained with mind-ssc features" in failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--features", "anatomix")
    other_grid = Geometry((10, 10, 10), (1, 1, 1), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    other = write_volume(np.zeros((10, 10, 10), np.uint8), other_grid, tmp_path / "other.nii.gz")
    message = failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--reference", other)
    assert "not on the target volume's grid" in message and "shape (10, 10, 10)" in message and "shape (40, 36, 28)" in message
    volume_geometry = nibabel.load(str(labels))
    strange = tmp_path / "strange.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.full(volume_geometry.shape, 7, np.uint8), volume_geometry.affine), str(strange))
    message = failing(tmp_path, capsys, "--volume", image, "--model", mind_models, "--reference", strange)
    assert "label values [7] that the models do not know" in message


def test_dice_and_hd95_by_hand():
    labels = default_labels(["background", "box"])
    reference = np.zeros((20, 20, 20), np.uint8)
    reference[5:10, 5:10, 5:10] = 1
    prediction = np.zeros_like(reference)
    prediction[5:10, 5:10, 7:12] = 1  # shifted by 2 voxels along k
    assert dice(prediction, reference, 1) == pytest.approx(2 * 75 / 250)
    assert hd95_mm(prediction, reference, 1, (1.0, 1.0, 3.0)) == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert hd95_mm(prediction, reference, 1, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    result = evaluate(prediction, reference, labels, (1.0, 1.0, 3.0))
    assert result["mean_dice"] == pytest.approx(0.6) and result["mean_hd95_mm"] == pytest.approx(6.0)
    assert dice(np.zeros_like(reference), np.zeros_like(reference), 1) is None
    assert hd95_mm(np.zeros_like(reference), reference, 1, (1, 1, 1)) is None
