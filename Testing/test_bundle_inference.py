"""The real MONAI bundle runs as its inference config says (SimpleInferer: the whole volume) at any volume size:
no zero padding up to the metadata's 128^3, no padding past what the network's strides need."""

import json
import shutil

import nibabel
import numpy as np
import pytest
import torch
from monai.data import create_test_image_3d

from conftest import shared_file
from entropymerge.bundle import read_bundle
from entropymerge.cli import main
from entropymerge.models import load_site_model
from entropymerge.padding import fit_to_volume, network_multiple

BUNDLE = "monai_bundle_segmentation_template"
IDENTITY = np.eye(4)
LPS_THICK_SLICES = np.diag([-0.8, -0.8, 1.2, 1.0])  # LPS storage, 1.2 mm slices

# name: (shape, affine, largest sphere radius). The radius scales with the volume like the bundle's 128^3 training
# data (30 there): with radius 30 in a 64^3 volume the network itself fails on some phantoms (plain forward Dice
# 0.002 for random_state 0), whatever the engine does.
PHANTOMS = {
    "64^3": ((64, 64, 64), IDENTITY, 15),
    "96^3": ((96, 96, 96), IDENTITY, 22),
    "128^3": ((128, 128, 128), IDENTITY, 30),
    "160x160x48": ((160, 160, 48), IDENTITY, 20),
    "LPS-1.2mm-100x90x70": ((100, 90, 70), LPS_THICK_SLICES, 20),  # no axis a multiple of the network's 8
}


def mean_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    present = [c for c in np.unique(truth) if c != 0]
    return float(np.mean([2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c))
                          for c in present]))


def plain_forward_labels(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The reference: one forward pass of the network over the whole (edge-padded to a multiple of 8) volume."""
    shape = image.shape
    pads = [(-s) % 8 for s in shape]
    tensor = torch.as_tensor(image, dtype=torch.float32)[None, None]
    tensor = torch.nn.functional.pad(tensor, [a for p in reversed(pads) for a in (0, p)], mode="replicate")
    with torch.inference_mode():
        logits = network(tensor)[0, :, : shape[0], : shape[1], : shape[2]]
    return logits.argmax(0).numpy()


@pytest.mark.parametrize("name", list(PHANTOMS))
def test_real_bundle_at_any_volume_size_matches_a_plain_forward(tmp_path, name):
    bundle = shared_file(BUNDLE)
    shape, affine, radius = PHANTOMS[name]
    image, truth = create_test_image_3d(*shape, 4, rad_max=radius, num_seg_classes=3, noise_max=0.5,
                                        random_state=np.random.RandomState(1))
    image = ((image - image.min()) / (image.max() - image.min())).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(image, affine), str(tmp_path / "phantom.nii.gz"))

    out = tmp_path / "out"
    assert main(["run", "--volume", str(tmp_path / "phantom.nii.gz"), "--model", str(bundle), "--method", "single",
                 "--out", str(out), "--progress", "none"]) == 0
    predicted = np.asanyarray(nibabel.load(str(out / "segmentation.nii.gz")).dataobj)
    assert predicted.shape == shape
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["inference"]["inferer"] == "whole"

    dice = mean_dice(predicted, truth)
    plain = mean_dice(plain_forward_labels(load_site_model(bundle).network, image), truth)
    print(f"{name}: run --method single Dice {dice:.4f}, plain whole-volume forward {plain:.4f}")
    assert dice >= 0.85
    assert abs(dice - plain) <= 0.02


def test_bundle_inferer_is_read_and_the_roi_fits_the_volume():
    bundle = shared_file(BUNDLE)
    card, _, notes = read_bundle(bundle)
    assert card.inference.inferer == "whole"  # inferer: SimpleInferer
    assert card.inference.roi_size == (128, 128, 128)  # the metadata's spatial_shape: the fallback window
    assert network_multiple(card.network) == (8, 8, 8)  # strides [2, 2, 2]
    settings = fit_to_volume(
        card.inference.__class__(card.inference.roi_size, spatial_multiple=(8, 8, 8)), (96, 90, 41), notes := [])
    assert settings.roi_size == (96, 96, 48)  # shrunk to the volume, rounded up to the stride multiple
    assert notes == []


def test_sliding_window_inferer_settings_are_read_from_the_config(tmp_path):
    bundle = shared_file(BUNDLE)
    copy = tmp_path / "bundle"
    (copy / "configs").mkdir(parents=True)
    shutil.copytree(bundle / "models", copy / "models")  # a copy: a model's files may not lie outside its folder
    (copy / "configs" / "metadata.json").write_text((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"), encoding="utf-8")
    config = (bundle / "configs" / "inference.yaml").read_text(encoding="utf-8").replace(
        "inferer:\n  _target_: SimpleInferer",
        "roi: [64, 64, 32]\ninferer:\n  _target_: SlidingWindowInferer\n  roi_size: '@roi'\n  overlap: 0.5\n"
        "  sw_batch_size: 3\n  mode: gaussian\n  padding_mode: replicate")
    (copy / "configs" / "inference.yaml").write_text(config, encoding="utf-8")
    card, _, _ = read_bundle(copy)
    settings = card.inference
    assert (settings.inferer, settings.roi_size, settings.overlap, settings.sw_batch_size) == ("sliding_window", (64, 64, 32), 0.5, 3)
    assert (settings.blend_mode, settings.padding_mode) == ("gaussian", "replicate")
    (copy / "configs" / "inference.yaml").write_text(config.replace("  mode: gaussian\n  padding_mode: replicate", ""), encoding="utf-8")
    unset = read_bundle(copy)[0].inference
    assert (unset.blend_mode, unset.padding_mode) == ("constant", "replicate")  # MONAI's blend; edge values, not zeros


def write_phantom(folder, name="64^3"):
    shape, affine, radius = PHANTOMS[name]
    image, truth = create_test_image_3d(*shape, 4, rad_max=radius, num_seg_classes=3, noise_max=0.5,
                                        random_state=np.random.RandomState(1))
    image = ((image - image.min()) / (image.max() - image.min())).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(image, affine), str(folder / "phantom.nii.gz"))
    return folder / "phantom.nii.gz", image, truth


def test_an_roi_larger_than_the_volume_or_off_the_stride_multiple_is_fitted_with_a_note(tmp_path, capsys):
    bundle = shared_file(BUNDLE)
    volume, image, truth = write_phantom(tmp_path)
    for roi, fitted in (("128 128 128", [64, 64, 64]), ("60 60 44", [64, 64, 48])):
        out = tmp_path / roi.replace(" ", "x")
        assert main(["run", "--volume", str(volume), "--model", str(bundle), "--method", "single", "--roi-size", *roi.split(),
                     "--out", str(out), "--progress", "none"]) == 0
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["inference"]["inferer"] == "sliding_window"
        assert summary["inference"]["roi_size"] == fitted
        rounded = [n for n in summary["notes"] if "rounded up" in n]
        if roi == "60 60 44":
            assert rounded == ["--roi-size (60, 60, 44) rounded up to (64, 64, 48): the network needs sizes that are "
                               "multiples of (8, 8, 8)"]
        else:
            assert rounded == []
        dice = mean_dice(np.asanyarray(nibabel.load(str(out / "segmentation.nii.gz")).dataobj), truth)
        assert dice >= 0.85, (roi, dice)


def test_a_whole_volume_that_does_not_fit_in_memory_runs_in_sliding_windows(tmp_path, monkeypatch):
    bundle = shared_file(BUNDLE)
    volume, image, truth = write_phantom(tmp_path)
    monkeypatch.setattr("entropymerge.inference.available_memory", lambda device: 1_000_000)  # 1 MB free
    out = tmp_path / "out"
    assert main(["run", "--volume", str(volume), "--model", str(bundle), "--method", "single", "--out", str(out),
                 "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert any("does not fit in cpu memory" in note and "sliding windows of (64, 64, 64)" in note for note in summary["notes"])
    dice = mean_dice(np.asanyarray(nibabel.load(str(out / "segmentation.nii.gz")).dataobj), truth)
    assert dice >= 0.85


def test_a_size_the_network_cannot_take_is_a_user_error_not_a_traceback():
    from entropymerge.errors import UserInputError
    from entropymerge.inference import predict_logits
    from entropymerge.modelcard import InferenceSettings

    network = load_site_model(shared_file(BUNDLE)).network
    unknown_multiple = InferenceSettings((36, 36, 36), inferer="whole")  # as for a network whose strides are not known
    with pytest.raises(UserInputError, match=r"cannot take an input of \(36, 36, 36\) voxels.*multiple"):
        predict_logits(network, torch.rand(1, 1, 36, 36, 36), unknown_multiple, torch.device("cpu"))


def test_sliding_windows_pad_only_axes_shorter_than_the_window():
    from monai.inferers import sliding_window_inference

    from conftest import tiny_unet_spec
    from entropymerge.inference import predict_logits
    from entropymerge.modelcard import InferenceSettings
    from entropymerge.safeconfig import build_network

    torch.manual_seed(0)
    network = build_network(tiny_unet_spec(1, 3), "test").eval()  # strides [2, 2]: multiple 4
    settings = InferenceSettings((16, 16, 16), 0.25, 2, spatial_multiple=(4, 4, 4))
    inputs = torch.rand(1, 1, 37, 21, 18)  # no axis a multiple of 4; every axis longer than the window
    with torch.inference_mode():
        expected = sliding_window_inference(inputs, (16, 16, 16), 2, network, 0.25, mode="gaussian")
    torch.testing.assert_close(predict_logits(network, inputs, settings, torch.device("cpu")), expected)

    short = torch.rand(1, 1, 37, 21, 10)  # the last axis is shorter than the window: fitted to 12, padded by 2
    fitted = fit_to_volume(settings, short.shape[2:], [])
    assert fitted.roi_size == (16, 16, 12)
    padded = torch.cat([short, short[..., -1:].expand(1, 1, 37, 21, 2)], dim=-1)
    with torch.inference_mode():
        expected = sliding_window_inference(padded, (16, 16, 12), 2, network, 0.25, mode="gaussian")[..., :10]
    torch.testing.assert_close(predict_logits(network, short, fitted, torch.device("cpu")), expected)


@pytest.mark.parametrize("spec, multiple", [
    ({"_target_": "UNet", "strides": [2, 2, 2]}, (8, 8, 8)),
    ({"_target_": "monai.networks.nets.UNet", "strides": [2, [2, 2, 1]]}, (4, 4, 2)),
    ({"_target_": "DynUNet", "strides": [1, 2, 2, 2, 2]}, (16, 16, 16)),
    ({"_target_": "SegResNet"}, (8, 8, 8)),
    ({"_target_": "SwinUNETR"}, (32, 32, 32)),
    ({"_target_": "SomethingElse"}, (1, 1, 1)),
    (None, (1, 1, 1)),  # TorchScript without a network definition
])
def test_network_multiple_from_the_definition(spec, multiple):
    assert network_multiple(spec) == multiple


def test_card_inference_settings_round_trip_and_bad_values_name_the_field():
    from conftest import make_card
    from entropymerge.errors import UserInputError
    from entropymerge.modelcard import InferenceSettings, ModelCard

    card = make_card()
    card.inference = InferenceSettings((48, 48, 32), 0.5, 2, "whole", "constant", "reflect")
    again = ModelCard.from_json(card.to_json(), "card.json").inference
    assert (again.inferer, again.roi_size, again.blend_mode, again.padding_mode) == ("whole", (48, 48, 32), "constant", "reflect")
    data = card.to_json()
    data["inference"]["inferer"] = "magic"
    with pytest.raises(UserInputError, match=r"inference.inferer.*sliding_window, whole.*'magic'"):
        ModelCard.from_json(data, "card.json")
