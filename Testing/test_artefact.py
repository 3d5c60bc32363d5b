"""Merged models as artefacts: run --save-model, merge, path --save-model-at; they load back as site models."""

import hashlib
import json

import nibabel
import numpy as np
import pytest
import torch
from monai.data import create_test_image_3d

from conftest import shared_file
from entropymerge.cli import main
from entropymerge.head import detect_head
from entropymerge.models import load_site_model, load_site_models
from entropymerge.summary import Coefficients, RunSummary
from entropymerge.weights import interpolate, merged_network
from test_adaptation import assert_bit_identical


def cli(*args) -> int:
    return main([*map(str, args), "--progress", "none"])


def segmentation(folder):
    return np.asanyarray(nibabel.load(str(folder / "segmentation.nii.gz")).dataobj)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("adapt", ["none", "dsbr"])
def test_saved_run_model_loads_back_and_reproduces_the_segmentation(tmp_path, mind_models, sphere_case, adapt):
    image, labels = sphere_case
    cache = ("--feature-cache", tmp_path / "cache")
    assert cli("run", "--volume", image, "--model", mind_models, "--out", tmp_path / "run", "--adapt", adapt,
               "--adapt-steps", "2", "--adapt-lr", "0.01", "--save-model", tmp_path / "model", *cache) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    card_path = tmp_path / "model" / "merged-image.json"
    assert summary["saved_model"] == {"model_card": str(card_path), "model_weights": str(tmp_path / "model" / "merged-image.safetensors")}
    card = json.loads(card_path.read_text(encoding="utf-8"))
    source = json.loads((mind_models / "site0.json").read_text(encoding="utf-8"))
    for field in ("labels", "preprocessing", "features", "input_channels", "network"):
        assert card[field] == source[field], field
    assert card["inference"] == summary["inference"] and card["weights"] == "merged-image.safetensors"
    training = card["training"]
    assert training["method"] == "adaptive" and training["volume"] == "image.nii.gz"
    assert training["merged_by"].startswith("entropymerge ")
    assert [s["name"] for s in training["sources"]] == ["site0", "site1", "site2"]
    assert [s["sha256"] for s in training["sources"]] == [sha256(mind_models / f"site{k}.safetensors") for k in range(3)]
    for part in ("body", "head"):
        assert training["coefficients"][part] == pytest.approx(summary["coefficients"][part], abs=1e-6)
    assert training["head_parameters"] and all(k.startswith("model.") for k in training["head_parameters"])
    assert (training["adaptation"] is None) == (adapt == "none")
    if adapt != "none":
        assert training["adaptation"]["method"] == "dsbr" and training["adaptation"]["restored"] is False
        assert "adapted with DSBR" in card["description"]
    # the artefact is a site model: alone, it segments the volume exactly as the run did
    assert cli("run", "--volume", image, "--model", card_path, "--method", "single", "--out", tmp_path / "again", *cache,
               "--save-model", tmp_path / "again") == 0  # the model may go into the run's own output folder
    np.testing.assert_array_equal(segmentation(tmp_path / "again"), segmentation(tmp_path / "run"))
    assert (tmp_path / "again" / "merged-image.json").is_file() and (tmp_path / "again" / "summary.json").is_file()


def test_adapted_real_bundle_is_saved_with_affine_norms_and_reproduces_its_run(tmp_path):
    bundle = shared_file("monai_bundle_segmentation_template")
    np.random.seed(1)
    image, _ = create_test_image_3d(64, 64, 64, 4, num_seg_classes=3, noise_max=0.5)
    volume = tmp_path / "spheres.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), np.eye(4)), str(volume))
    assert cli("run", "--volume", volume, "--model", bundle, "--adapt", "dsbr", "--adapt-steps", "2",
               "--out", tmp_path / "run", "--save-model", tmp_path / "model") == 0
    record = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))["adaptation"]
    assert record["identity_affine_layers"] > 0 and record["restored"] is False and record["steps_run"] == 2
    card = json.loads((tmp_path / "model" / "merged-spheres.json").read_text(encoding="utf-8"))
    norm, arguments = card["network"]["norm"]  # the bundle's UNet had MONAI's default norm, without affine parameters
    assert norm.lower() == "instance" and arguments == {"affine": True}
    assert card["labels"][3]["name"] == "category 3" and card["inference"]["roi_size"] == [128, 128, 128]
    assert card["training"]["sources"][0]["sha256"] == sha256(bundle / "models" / "model.pt")
    saved = load_site_model(tmp_path / "model" / "merged-spheres.json")
    affines = [m.weight for m in saved.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert affines and not all(torch.equal(w, torch.ones_like(w)) for w in affines)  # the adapted affines, not identities
    assert cli("run", "--volume", volume, "--model", tmp_path / "model" / "merged-spheres.json", "--method", "single",
               "--out", tmp_path / "again") == 0
    np.testing.assert_array_equal(segmentation(tmp_path / "again"), segmentation(tmp_path / "run"))


def test_merge_writes_the_weighted_merge_and_reads_a_runs_coefficients(tmp_path, mind_models, sphere_case, capsys):
    models = load_site_models([mind_models])
    given = ("--model", mind_models / "site0.json", "--model", mind_models / "site1.json", "--model", mind_models / "site2.json")
    assert cli("merge", *given, "--coefficients", "0.5,0.3,0.2", "--out", tmp_path / "weighted") == 0
    assert "model card: " in capsys.readouterr().out
    saved = load_site_model(tmp_path / "weighted" / "merged.json")
    assert_bit_identical(saved.network.state_dict(), merged_network(models, [0.5, 0.3, 0.2]).state_dict())
    assert saved.card.training["coefficients"] == {"body": {"site0": 0.5, "site1": 0.3, "site2": 0.2}, "head": None}
    assert saved.card.training["method"] == "weighted" and saved.card.training["volume"] is None
    # separate head coefficients merge the detected head's parameters only
    assert cli("merge", *given, "--coefficients", "0.5,0.3,0.2", "--head-coefficients", "0,0,1", "--name", "split",
               "--out", tmp_path / "split") == 0
    head = detect_head(models[0].network, 3)
    split = load_site_model(tmp_path / "split" / "split.json").network.state_dict()
    for key, value in split.items():
        expected = (models[2] if key in head.keys else saved).network.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0 if key in head.keys else 1e-7)
    # --from-summary: the merge of a run, without the volume
    image, _ = sphere_case
    assert cli("run", "--volume", image, "--model", mind_models, "--out", tmp_path / "run", "--feature-cache", tmp_path / "cache",
               "--save-model", tmp_path / "run-model") == 0
    assert cli("merge", *given, "--from-summary", tmp_path / "run" / "summary.json", "--out", tmp_path / "again") == 0
    from_run = load_site_model(tmp_path / "run-model" / "merged-image.json").network.state_dict()
    for key, value in load_site_model(tmp_path / "again" / "merged.json").network.state_dict().items():
        torch.testing.assert_close(value, from_run[key], rtol=1e-4, atol=1e-5)  # the summary rounds to 6 decimals


def test_path_saves_the_interpolated_model(tmp_path, mind_models, sphere_case):
    image, _ = sphere_case
    a, b = mind_models / "site0.json", mind_models / "site2.json"
    assert cli("path", "--volume", image, "--model", a, "--model", b, "--steps", "2", "--save-model-at", "0.3",
               "--out", tmp_path / "path", "--feature-cache", tmp_path / "cache") == 0
    summary = json.loads((tmp_path / "path" / "summary.json").read_text(encoding="utf-8"))
    assert summary["outputs"]["model_card"] == "interpolated.json"
    saved = load_site_model(tmp_path / "path" / "interpolated.json")
    assert_bit_identical(saved.network.state_dict(), interpolate(load_site_model(a), load_site_model(b), 0.3).state_dict())
    assert saved.card.training["coefficients"]["body"] == {"site0": 0.7, "site2": 0.3}
    assert saved.card.training["method"] == "interpolation"


def failing(capsys, *args) -> str:
    code = cli(*args)
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    return error


def test_bad_merge_and_save_options_exit_2(tmp_path, capsys, mind_models, sphere_case):
    image, _ = sphere_case
    models = ("--model", mind_models)
    merge = ("merge", *models, "--out", tmp_path / "m")
    assert "--coefficients has 2 values but 3 models were given" in failing(capsys, *merge, "--coefficients", "0.5,0.5")
    assert "must be finite and non-negative; got [1.2, -0.1, -0.1]" in failing(capsys, *merge, "--coefficients", "1.2,-0.1,-0.1")
    error = failing(capsys, *merge, "--coefficients", "0.5,0.5,0.5")
    assert "must sum to 1 (they are not normalised for you)" in error and "sum to 1.5" in error
    assert "comma-separated numbers" in failing(capsys, *merge, "--coefficients", "a,b,c")
    assert "--head-coefficients has 1 values but 3" in failing(capsys, *merge, "--head-coefficients", "1")
    assert "not allowed with argument" in failing(capsys, *merge, "--coefficients", "1,0,0", "--from-summary", tmp_path / "s.json")
    assert "not a readable run summary" in failing(capsys, *merge, "--from-summary", tmp_path / "missing.json")
    assert not (tmp_path / "m").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data", encoding="utf-8")
    assert "is not empty; choose another folder or add --overwrite" in failing(capsys, "merge", *models, "--out", tmp_path / "full")
    assert "holds an input of this command" in failing(capsys, "merge", *models, "--out", mind_models, "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text(encoding="utf-8") == "user data"
    run = ("run", "--volume", image, *models, "--out", tmp_path / "run")
    assert "--method ensemble runs every model" in failing(capsys, *run, "--method", "ensemble", "--save-model", tmp_path / "e")
    assert "is not empty" in failing(capsys, *run, "--save-model", tmp_path / "full")
    assert not (tmp_path / "run").exists()
    two = ("--model", mind_models / "site0.json", "--model", mind_models / "site1.json")
    assert "--save-model-at must lie in [0, 1]" in failing(capsys, "path", "--volume", image, *two, "--save-model-at", "1.5",
                                                            "--out", tmp_path / "p")
    # a summary from a run over other models
    summary = tmp_path / "other.json"
    summary.write_text(json.dumps(RunSummary(method="mean", coefficients=Coefficients({"x": 0.5, "y": 0.5})).to_json()), encoding="utf-8")
    assert "names the models x, y, but site0, site1, site2 were given" in failing(capsys, *merge, "--from-summary", summary)
