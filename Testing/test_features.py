"""Stable features: MIND-SSC invariances, the anatomix network's exact layout, weights handling, the cache."""

import hashlib
import json

import numpy as np
import pytest
import torch
from monai.data import create_test_image_3d

from conftest import REPOSITORY
from entropymerge.anatomix import AnatomixNetwork
from entropymerge.errors import UserInputError
from entropymerge.features import Anatomix, FeatureCache, MindSSC, fetch_weights, get_extractor, instance_normalize, model_inputs
from entropymerge.modelcard import FeatureSpec
from entropymerge.padding import pad_to_multiple

MANIFEST = REPOSITORY.parent / "shared" / "reference" / "anatomix_state_dict_manifest.json"


@pytest.fixture(scope="module")
def phantom() -> torch.Tensor:
    image, _ = create_test_image_3d(40, 40, 40, 5, rad_max=9, num_seg_classes=3, noise_max=0.05,
                                    random_state=np.random.RandomState(0))
    return torch.from_numpy(image)[None, None].float()


def manifest() -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"anatomix manifest not available: {MANIFEST}")
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


@pytest.mark.parametrize("remap", [lambda x: 3.0 * x + 7.0, lambda x: 1.0 - x, lambda x: 0.2 * x - 5.0],
                         ids=["scale-offset", "inverted-contrast", "shrunk"])
def test_mind_ssc_ignores_affine_and_inverted_intensity_maps(phantom, remap):
    extractor = MindSSC()
    reference = extractor(phantom)
    assert reference.shape == (1, 12, 40, 40, 40)
    torch.testing.assert_close(extractor(remap(phantom)), reference, atol=2e-3, rtol=0)


def test_mind_ssc_stays_close_under_a_nonlinear_monotonic_map(phantom):
    extractor = MindSSC()
    correlation = np.corrcoef(extractor(phantom).flatten(), extractor(phantom.sqrt()).flatten())[0, 1]
    assert correlation > 0.85


def test_mind_ssc_follows_a_spatial_shift(phantom):
    extractor = MindSSC()
    reference = extractor(phantom)
    moved = extractor(torch.roll(phantom, shifts=3, dims=2))
    assert (moved - reference).abs().mean() > 0.3, "a shifted volume must give other features"
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    torch.testing.assert_close(moved[interior], torch.roll(reference, shifts=3, dims=2)[interior], atol=0.05, rtol=0)


def test_features_are_z_scored_per_channel(phantom):
    features = MindSSC()(phantom)
    torch.testing.assert_close(features.mean(dim=(2, 3, 4)), torch.zeros(1, 12), atol=1e-4, rtol=0)
    torch.testing.assert_close(features.std(dim=(2, 3, 4), unbiased=False), torch.ones(1, 12), atol=1e-3, rtol=0)
    torch.testing.assert_close(instance_normalize(torch.full((1, 2, 3, 3, 3), 5.0)), torch.zeros(1, 2, 3, 3, 3))


def test_pad_to_multiple_and_crop_back():
    volume = torch.rand(1, 1, 33, 40, 17)
    padded, crop = pad_to_multiple(volume, 16)
    assert padded.shape == (1, 1, 48, 48, 32)
    torch.testing.assert_close(padded[crop], volume)


def test_anatomix_network_matches_the_published_manifest():
    facts = manifest()
    state = AnatomixNetwork().state_dict()
    assert [key for key, _, _ in facts["state_dict"]] == list(state)
    for key, shape, dtype in facts["state_dict"]:
        assert list(state[key].shape) == shape, key
        assert str(state[key].dtype) == f"torch.{dtype}", key
    assert sum(p.numel() for p in AnatomixNetwork().parameters()) == facts["num_parameters"]
    for layer in facts["sequential_layers"]:
        module = AnatomixNetwork().model[layer["index"]]
        assert type(module).__name__ == layer["type"], layer
        if layer["type"] == "Conv3d":
            assert module.padding_mode == layer["padding_mode"] and (module.bias is not None) == layer["bias"]


def manifest_state_dict(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in manifest()["state_dict"]:
        if dtype == "int64":
            state[key] = torch.tensor(10, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


def test_anatomix_loads_manifest_shaped_weights_strictly_and_pads_to_16(tmp_path):
    weights = tmp_path / "anatomix.pth"
    torch.save(manifest_state_dict(), weights)
    network = AnatomixNetwork()
    network.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    extractor = Anatomix(weights)
    features = extractor(torch.rand(1, 1, 20, 36, 18))  # not multiples of 16: padded, then cropped back
    assert features.shape == (1, 16, 20, 36, 18)
    assert torch.isfinite(features).all()


def test_anatomix_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("ENTROPYMERGE_ANATOMIX_WEIGHTS", raising=False)
    monkeypatch.setenv("ENTROPYMERGE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserInputError, match="never runs with random weights.*entropymerge fetch-weights anatomix"):
        get_extractor("anatomix")
    with pytest.raises(UserInputError, match="anatomix weights not found"):
        get_extractor("anatomix", anatomix_weights=tmp_path / "missing.pth")
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserInputError, match="is not the anatomix network's weights"):
        get_extractor("anatomix", anatomix_weights=tmp_path / "wrong.pth")


def test_unknown_extractor_is_named():
    with pytest.raises(UserInputError, match="unknown feature extractor 'sift'; known: mind-ssc, anatomix"):
        get_extractor("sift")


def test_fetch_weights_checks_the_checksum_and_the_contents(tmp_path):
    source = tmp_path / "published.pth"
    torch.save(manifest_state_dict(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    destination = tmp_path / "cache" / "weights" / "anatomix.pth"
    with pytest.raises(UserInputError, match="has SHA-256 .* not the expected"):
        fetch_weights(source.as_uri(), "0" * 64, destination, lambda p: Anatomix(p))
    assert not destination.exists() and not list(destination.parent.glob("*.partial"))
    fetch_weights(source.as_uri(), digest, destination, lambda p: Anatomix(p))
    assert destination.read_bytes() == source.read_bytes()
    fake = tmp_path / "fake.pth"
    torch.save({"x": torch.zeros(2)}, fake)
    with pytest.raises(UserInputError, match="is not the anatomix network's weights"):
        fetch_weights(fake.as_uri(), hashlib.sha256(fake.read_bytes()).hexdigest(), tmp_path / "other" / "anatomix.pth", lambda p: Anatomix(p))
    assert not (tmp_path / "other" / "anatomix.pth").exists()


def test_model_inputs_concatenate_image_and_features_and_use_the_cache(tmp_path, phantom):
    spec = FeatureSpec("mind-ssc", "1", 12)
    cache = FeatureCache(tmp_path / "cache")
    first = model_inputs(phantom[0], spec, cache=cache)
    assert first.inputs.shape == (1, 13, 40, 40, 40) and not first.cached
    torch.testing.assert_close(first.inputs[:, :1], phantom)
    second = model_inputs(phantom[0], spec, cache=cache)
    assert second.cached
    torch.testing.assert_close(second.inputs, first.inputs)
    other = model_inputs(phantom[0] * 0.5, spec, cache=cache)
    assert not other.cached, "another volume content must miss the cache"
    assert model_inputs(phantom[0], None).inputs.shape == (1, 1, 40, 40, 40)


def test_feature_spec_must_match_the_extractor(phantom):
    with pytest.raises(UserInputError, match="trained with mind-ssc v2 .* provides mind-ssc v1"):
        model_inputs(phantom[0], FeatureSpec("mind-ssc", "2", 12))
