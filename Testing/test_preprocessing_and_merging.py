"""Model-space round trips keep anatomy in place; merging is a convex combination of weights."""

import numpy as np
import pytest
import torch

from conftest import shared_file
from entropymerge.entropy import normalized_entropy
from entropymerge.merging import mean_coefficients
from entropymerge.modelcard import Preprocessing
from entropymerge.models import load_site_models
from entropymerge.preprocessing import to_input_grid, to_model_space
from entropymerge.volume import Geometry, Volume
from entropymerge.weights import check_coefficients, merge_state_dicts, merged_network


def block_volume(geometry: Geometry) -> Volume:
    array = np.zeros(geometry.shape, np.float32)
    lo = [n // 3 for n in geometry.shape]
    hi = [2 * n // 3 for n in geometry.shape]
    array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    return Volume(array, geometry)


@pytest.mark.parametrize(
    "preprocessing",
    [Preprocessing("RAS", (1.3, 1.7, 2.2)), Preprocessing("PSR", None), Preprocessing(None, (2.5, 2.5, 2.5)), Preprocessing()],
    ids=["RAS-aniso", "PSR", "iso-2.5", "as-stored"],
)
@pytest.mark.parametrize("relative", ["abdomen_totalseg_ct_mr/example_mr_sm.nii.gz", "tiny_monai_testing_data/anatomical.nii"])
def test_model_space_round_trip_keeps_a_block_in_place(preprocessing, relative):
    from entropymerge.volume import read_volume

    volume = block_volume(read_volume(shared_file(relative)).geometry)
    image = to_model_space(volume, preprocessing)
    if preprocessing.orientation:
        assert image.geometry.orientation == preprocessing.orientation
    if preprocessing.spacing:
        np.testing.assert_allclose(image.geometry.spacing, preprocessing.spacing, atol=1e-6)
    back = to_input_grid(image.tensor.as_tensor(), image)[0].numpy()
    assert back.shape == volume.geometry.shape
    inside, truth = back > 0.5, volume.array > 0.5
    assert 2 * (inside & truth).sum() / (inside.sum() + truth.sum()) > 0.98
    shift = np.abs(np.argwhere(inside).mean(0) - np.argwhere(truth).mean(0))
    assert shift.max() < 0.1, f"centre of mass moved by {shift} voxels"


def test_physical_position_survives_reorientation():
    # A block in an LPS-stored oblique volume must sit at the same physical (RAS) place in model space.
    angle = np.deg2rad(10)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry((30, 24, 18), (1.0, 1.5, 2.0), (5.0, -3.0, 12.0), tuple(map(tuple, direction)))
    volume = block_volume(geometry)
    image = to_model_space(volume, Preprocessing("RAS", None))
    model_voxels = np.argwhere(image.tensor[0].numpy() > 0.5).mean(0)
    input_voxels = np.argwhere(volume.array > 0.5).mean(0)
    model_ras = image.tensor.affine.numpy() @ np.append(model_voxels, 1)
    input_ras = geometry.affine_ras @ np.append(input_voxels, 1)
    np.testing.assert_allclose(model_ras[:3], input_ras[:3], atol=1e-3)


def test_entropy_bounds():
    one_hot = torch.zeros(1, 4, 2, 2, 2)
    one_hot[:, 2] = 1
    uniform = torch.full((1, 4, 2, 2, 2), 0.25)
    assert normalized_entropy(one_hot).max().item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_entropy(uniform).min().item() == pytest.approx(1.0, abs=1e-6)
    assert normalized_entropy(uniform).shape == (1, 2, 2, 2)


def test_merging_copies_of_one_model_gives_that_model(tmp_path, model_factory):
    card = model_factory("a", seed=5)
    models = load_site_models([card, card, card])
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = models[0].network(x)
        for coefficients in ([1 / 3] * 3, [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]):
            torch.testing.assert_close(merged_network(models, coefficients)(x), expected, atol=1e-5, rtol=1e-5)


def test_mean_merge_averages_weights_and_keeps_integer_buffers(model_factory):
    models = load_site_models([model_factory("a", seed=1), model_factory("b", seed=2)])
    states = [m.state_dict() for m in models]
    states[1] = dict(states[1], counter=torch.tensor(7))
    states[0] = dict(states[0], counter=torch.tensor(3))
    merged = merge_state_dicts(states, mean_coefficients(models))
    key = "model.0.conv.unit0.conv.weight"
    torch.testing.assert_close(merged[key], (states[0][key] + states[1][key]) / 2)
    assert merged["counter"].item() == 3
    before = [s[key].clone() for s in states]
    merged_network(models, [0.3, 0.7])
    for model, original in zip(models, before):
        assert torch.equal(model.state_dict()[key], original), "site models must stay untouched"


def test_coefficients_must_be_convex():
    with pytest.raises(ValueError, match="sum to 1"):
        check_coefficients([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="non-negative"):
        check_coefficients([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="expected 3 coefficients"):
        check_coefficients([0.5, 0.5], 3)
