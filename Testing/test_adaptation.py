"""Collapse-safe test-time adaptation (TENT, DSBR, the guard) and the interpolation path between two site models."""

import copy
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from conftest import make_card
from entropymerge.adaptation import adapt, adaptation_loss, add_identity_affines, collapse, normalization_parameters, proportion_loss
from entropymerge.cli import main
from entropymerge.entropy import class_balanced_entropy
from entropymerge.errors import UserInputError
from entropymerge.merging import adaptive_plan
from entropymerge.models import load_site_model, save_site_model
from entropymerge.probe import apply_batchnorm_policy, probe_probabilities, select_probe
from entropymerge.safeconfig import build_network
from entropymerge.settings import AdaptationSettings, MergeSettings
from entropymerge.weights import interpolate
from test_adaptive_merging import LAST_CONV, phantom_probe_inputs

CPU = torch.device("cpu")


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_dsbr_loss_weights_each_predicted_class_equally():
    # four voxels: three predicted background (p_bg 0.9, 0.8, 0.6), one predicted foreground (p_fg 0.7)
    p_background = torch.tensor([0.9, 0.8, 0.6, 0.3])
    probabilities = torch.stack([p_background, 1 - p_background])[None, :, :, None, None]  # (1, 2, 4, 1, 1)
    h = [binary_entropy(p) for p in (0.9, 0.8, 0.6, 0.7)]
    dsbr = adaptation_loss(probabilities, "dsbr")
    assert float(dsbr) == pytest.approx(0.5 * (sum(h[:3]) / 3 + h[3]), rel=1e-5)
    assert float(adaptation_loss(probabilities, "tent")) == pytest.approx(sum(h) / 4, rel=1e-5)
    # the statistic the merge reports is the same quantity
    assert float(dsbr) == pytest.approx(class_balanced_entropy(probabilities), rel=1e-5)
    # more easy background voxels change TENT's loss but not DSBR's class weights
    more = torch.cat([probabilities, probabilities[:, :, :3]], dim=2)
    assert float(adaptation_loss(more, "dsbr")) == pytest.approx(float(dsbr), rel=1e-5)
    assert float(adaptation_loss(more, "tent")) != pytest.approx(float(adaptation_loss(probabilities, "tent")), rel=1e-3)


def test_loss_of_probe_batches_sums_to_the_probe_loss():
    probabilities = torch.softmax(3 * torch.randn(4, 3, 6, 6, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    counts = torch.bincount(probabilities.max(dim=1).indices.flatten(), minlength=3)
    for method in ("tent", "dsbr"):
        parts = adaptation_loss(probabilities[:2], method, counts) + adaptation_loss(probabilities[2:], method, counts)
        assert float(parts) == pytest.approx(float(adaptation_loss(probabilities, method)), rel=1e-5)


def test_reliable_voxel_filter_counts_only_voxels_below_the_entropy_threshold():
    p_background = torch.tensor([0.99, 0.9, 0.6, 0.05, 0.45])  # entropies: 0.08, 0.47, 0.97, 0.29, 0.99
    probabilities = torch.stack([p_background, 1 - p_background])[None, :, :, None, None]
    h = [binary_entropy(p) for p in (0.99, 0.9, 0.6, 0.95, 0.55)]
    reliable = [0, 1, 3]  # h < 0.5
    assert float(adaptation_loss(probabilities, "tent", reliable_below=0.5)) == pytest.approx(sum(h[i] for i in reliable) / 3, rel=1e-5)
    # background: voxels 0 and 1 count; foreground: voxel 3 (voxel 4 is foreground but unreliable)
    assert float(adaptation_loss(probabilities, "dsbr", reliable_below=0.5)) == pytest.approx(0.5 * ((h[0] + h[1]) / 2 + h[3]), rel=1e-5)
    assert float(adaptation_loss(probabilities, "tent", reliable_below=1.0)) == pytest.approx(float(adaptation_loss(probabilities, "tent")))
    # nothing reliable: a zero loss, not a division by zero
    assert float(adaptation_loss(probabilities, "dsbr", reliable_below=0.01)) == 0.0
    with pytest.raises(UserInputError, match=r"--adapt-reliable must be in \(0, 1\] \(a fraction of log C\), got 1.5"):
        AdaptationSettings("dsbr", reliable_below=1.5).check()


def test_norm_layers_without_affine_get_identity_affines_that_change_nothing_until_adapted(probe):
    from monai.networks.nets import UNet

    torch.manual_seed(5)
    network = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()  # MONAI's default: instance norm, no affine
    norms = [m for m in network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.weight is None for m in norms) and not normalization_parameters(network)
    before = snapshot(network)
    with torch.no_grad():
        expected = network(probe.patches)
    copied = copy.deepcopy(network)
    assert add_identity_affines(copied) == len(norms)
    assert len(normalization_parameters(copied)) == 2 * len(norms)
    with torch.no_grad():
        assert_bit_identical({"logits": copied(probe.patches)}, {"logits": expected})  # bit for bit before any step
    adapted, result = adapt(network, probe, AdaptationSettings("dsbr", 2, 1e-2), CPU)
    assert result.identity_affine_layers == len(norms) and result.parameters == 2 * sum(m.num_features for m in norms)
    assert_bit_identical(network.state_dict(), before)  # the input network keeps its layout and values
    assert all(m.weight is None for m in norms)
    trained = [p for p in normalization_parameters(adapted) if not torch.equal(p, torch.ones_like(p)) and not torch.equal(p, torch.zeros_like(p))]
    assert trained, "the identity affines were adapted"
    with torch.no_grad():
        assert not torch.equal(adapted(probe.patches), expected)


def test_group_and_layer_norms_without_affine_get_identity_affines():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4, affine=False),
                                  torch.nn.LayerNorm([4, 6, 6, 6], elementwise_affine=False))
    inputs = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(inputs)
    assert add_identity_affines(network) == 2
    assert network[1].weight.shape == (4,) and network[2].weight.shape == (4, 6, 6, 6) and network[2].bias.shape == (4, 6, 6, 6)
    with torch.no_grad():
        # group and layer norm kernels round differently once they have an affine (instance and batch norm do not)
        torch.testing.assert_close(network(inputs), expected, rtol=0, atol=2e-6)
    assert add_identity_affines(network) == 0  # layers with affines are left alone


def test_proportion_term_is_the_kl_divergence_of_the_class_mix_and_holds_it_in_place(probe):
    probabilities = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    now = probabilities.mean(dim=(0, 2, 3, 4))
    assert float(proportion_loss(probabilities, now)) == pytest.approx(0.0, abs=1e-7)
    start = torch.tensor([0.5, 0.25, 0.25])
    expected = float((start * (start / now).log()).sum()) / math.log(3)
    assert float(proportion_loss(probabilities, start)) == pytest.approx(expected, rel=1e-5) and expected > 0
    network = biased_network(seed=6)
    drift = {}
    for weight in (0.0, 10.0):
        _, result = adapt(network, probe, AdaptationSettings("dsbr", 3, 3e-2, restore_on_collapse=False, prior_weight=weight), CPU)
        drift[weight] = float(np.abs(result.proportions[-1] - result.proportions[0]).sum())
        assert result.describe(["a", "b", "c"], AdaptationSettings("dsbr", 3, 3e-2, prior_weight=weight))["prior_weight"] == weight
    assert drift[10.0] < drift[0.0]
    with pytest.raises(UserInputError, match="--adapt-prior must be >= 0, got -1"):
        AdaptationSettings("dsbr", prior_weight=-1).check()


def test_guard_rules():
    names = ["background", "organ", "lesion"]
    start = np.array([0.90, 0.08, 0.02])
    assert collapse(start, np.array([0.88, 0.09, 0.03]), names) is None
    exact = np.array([0.75, 0.2, 0.05])  # binary fractions: 1.25x and 0.5x of its foreground are exact
    assert collapse(exact, np.array([0.6875, 0.25, 0.0625]), names) is None  # exactly 1.25x the foreground is allowed
    assert collapse(exact, np.array([0.875, 0.1, 0.025]), names) is None  # exactly 0.5x too
    assert collapse(start, np.array([0.85, 0.12, 0.03]), names)[0] == "foreground_fraction"  # 1.5x
    rule, message = collapse(start, np.array([0.90, 0.10, 0.0]), names)
    assert rule == "class_vanished" and message == "no probe voxel is predicted as lesion any more"
    rule, message = collapse(start, np.array([0.96, 0.03, 0.01]), names)
    assert rule == "foreground_fraction" and "from 0.1000 to 0.0400" in message
    assert collapse(start, np.array([0.75, 0.2, 0.05]), names)[0] == "foreground_fraction"


def biased_network(seed: int = 0, background_bias: float = 1.0) -> torch.nn.Module:
    """A small UNet whose head favours background, so most probe voxels are background (as in a trained model)."""
    torch.manual_seed(seed)
    network = build_network(make_card("biased").network, "test").eval()
    with torch.no_grad():
        dict(network.named_modules())[LAST_CONV].bias[0] += background_bias
    return network


@pytest.fixture
def probe():
    return select_probe(phantom_probe_inputs(), (32, 32, 32), max_patches=3)


def snapshot(network: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def assert_bit_identical(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        bits = lambda tensor: tensor.flatten().view(torch.uint8)
        assert value.dtype == state[key].dtype and torch.equal(bits(value), bits(state[key])), key


@pytest.mark.parametrize("method", ["tent", "dsbr"])
def test_guard_restores_the_weights_when_forced_to_collapse(probe, method):
    network = biased_network()
    before = snapshot(network)
    names = ["background", "organ", "lesion"]
    unguarded, watched = adapt(network, probe, AdaptationSettings(method, 3, 1.0, restore_on_collapse=False), CPU, class_names=names)
    assert watched.guard is not None and not watched.restored and len(watched.losses) == 3
    assert collapse(watched.proportions[0], watched.proportions[-1], names) is not None  # it did collapse
    restored, result = adapt(network, probe, AdaptationSettings(method, 3, 1.0), CPU, class_names=names)
    assert result.restored and result.guard == watched.guard
    assert result.guard["rule"] in ("class_vanished", "foreground_fraction") and result.guard["step"] == len(result.losses)
    assert restored is network
    assert_bit_identical(restored.state_dict(), before)
    record = result.describe(names, AdaptationSettings(method, 3, 1.0))
    assert record["guard_fired"] is True and record["restored"] is True and record["steps_run"] == result.guard["step"]
    assert set(record["proportions_before"]) == set(names)


def test_adaptation_changes_only_normalisation_affines_and_never_the_site_models(model_factory, probe):
    models = [load_site_model(model_factory(f"m{i}", seed=30 + i)) for i in range(3)]
    site_states = [snapshot(m.network) for m in models]
    outputs = [probe_probabilities(m.network, probe, CPU) for m in models]
    plan = adaptive_plan(models, probe, outputs, MergeSettings(), CPU)
    merged = plan.network(models)
    merged_state = snapshot(merged)
    adapted, result = adapt(merged, probe, AdaptationSettings("dsbr", 3, 1e-2), CPU)
    assert not result.restored and result.guard is None and len(result.losses) == 3
    for model, state in zip(models, site_states):
        assert_bit_identical(model.state_dict(), state)
    assert_bit_identical(merged.state_dict(), merged_state)
    adapted_names = {id(p) for p in normalization_parameters(adapted)}
    norm_keys = {name for name, p in adapted.named_parameters() if id(p) in adapted_names}
    assert norm_keys and all(".adn.N." in key for key in norm_keys)
    changed = {key for key, value in adapted.state_dict().items() if not torch.equal(value, merged_state[key])}
    assert changed and changed <= norm_keys
    assert result.parameters == sum(adapted.state_dict()[k].numel() for k in norm_keys)


def test_batch_norm_adapts_on_probe_statistics_without_touching_the_input(probe):
    from monai.networks.nets import UNet

    torch.manual_seed(3)
    network = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch").eval()
    before = snapshot(network)
    adapted, result = adapt(network, probe, AdaptationSettings("dsbr", 2, 1e-3), CPU)
    assert not result.restored and adapted is not network and not adapted.training
    assert_bit_identical(network.state_dict(), before)  # batch statistics while adapting never reach the input's buffers
    again = copy.deepcopy(adapted)
    apply_batchnorm_policy(again, probe, "reestimate", CPU)
    running = [key for key in before if key.endswith(("running_mean", "running_var"))]
    assert running
    for key in running:  # the adapted model's statistics are the probe's, under its adapted weights
        assert not torch.equal(adapted.state_dict()[key], before[key])
        torch.testing.assert_close(adapted.state_dict()[key], again.state_dict()[key])


def test_adaptation_is_deterministic(probe):
    network = biased_network(seed=4)
    first, first_result = adapt(network, probe, AdaptationSettings("tent", 3, 1e-2, seed=7), CPU)
    second, second_result = adapt(network, probe, AdaptationSettings("tent", 3, 1e-2, seed=7), CPU)
    assert first_result.losses == second_result.losses
    assert_bit_identical(first.state_dict(), snapshot(second))


def test_adaptation_settings_are_checked():
    with pytest.raises(UserInputError, match="unknown adaptation 'sgd'; choose one of none, tent, dsbr"):
        AdaptationSettings("sgd").check()
    with pytest.raises(UserInputError, match="--adapt-lr must be > 0, got 0"):
        AdaptationSettings("tent", learning_rate=0).check()
    with pytest.raises(UserInputError, match="--adapt-steps must be at least 1, got 0"):
        AdaptationSettings("tent", steps=0).check()


def test_interpolate_returns_the_endpoints_exactly(model_factory):
    model_a, model_b = (load_site_model(model_factory(name, seed=seed)) for name, seed in (("a", 1), ("b", 2)))
    with torch.no_grad():
        next(model_a.network.parameters()).view(-1)[0] = -0.0  # a sum that starts from +0.0 would lose this sign
    state_a, state_b = snapshot(model_a.network), snapshot(model_b.network)
    assert_bit_identical(interpolate(model_a, model_b, 0.0).state_dict(), state_a)
    assert_bit_identical(interpolate(model_a, model_b, 1.0).state_dict(), state_b)
    middle = interpolate(model_a, model_b, 0.25)
    assert middle is not model_a.network
    for key, value in middle.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * state_a[key] + 0.25 * state_b[key])
    assert_bit_identical(model_a.state_dict(), state_a)
    with pytest.raises(UserInputError, match=r"must lie in \[0, 1\], got 1.5"):
        interpolate(model_a, model_b, 1.5)


# ---------------------------------------------------------------------------------------------
# Through the command line


def cli(tmp_path, *args) -> dict:
    out = tmp_path / "out"
    code = main([*map(str, args), "--out", str(out), "--progress", "none", "--feature-cache", str(tmp_path / "cache")])
    assert code == 0
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_run_with_dsbr_records_the_adaptation(tmp_path, mind_models, sphere_case):
    image, labels = sphere_case
    summary = cli(tmp_path, "run", "--volume", image, "--model", mind_models, "--reference", labels,
                  "--adapt", "dsbr", "--adapt-steps", "2", "--adapt-lr", "0.001")
    record = summary["adaptation"]
    assert record["method"] == "dsbr" and record["steps"] == 2 and record["learning_rate"] == 0.001
    assert len(record["loss_per_step"]) == record["steps_run"] == 2 and all(v > 0 for v in record["loss_per_step"])
    assert set(record["proportions_before"]) == {"background", "structure 1", "structure 2"}
    assert sum(record["proportions_after"].values()) == pytest.approx(1.0, abs=1e-5)
    assert record["guard_fired"] is False and record["restored"] is False
    assert "adapt" in summary["timings_s"] and 0.0 <= summary["evaluation"]["mean_dice"] <= 1.0
    assert cli(tmp_path / "plain", "run", "--volume", image, "--model", mind_models)["adaptation"] is None


def test_run_with_a_collapsing_tent_restores_the_merged_model(tmp_path, sphere_case):
    image, _ = sphere_case
    card = make_card("biased", roi=(32, 32, 32))
    save_site_model(biased_network(background_bias=2.0), card, tmp_path / "models", "biased")
    model = tmp_path / "models" / "biased.json"
    adapted = cli(tmp_path / "tent", "run", "--volume", image, "--model", model, "--adapt", "tent", "--adapt-lr", "10")
    record = adapted["adaptation"]
    assert record["guard_fired"] is True and record["restored"] is True
    assert any("TENT adaptation stopped at step" in note and "pre-adaptation weights are used" in note for note in adapted["notes"])
    cli(tmp_path / "plain", "run", "--volume", image, "--model", model)
    import nibabel

    read = lambda folder: np.asanyarray(nibabel.load(str(folder / "out" / "segmentation.nii.gz")).dataobj)
    np.testing.assert_array_equal(read(tmp_path / "tent"), read(tmp_path / "plain"))


def failing(tmp_path, capsys, *args) -> str:
    code = main([*map(str, args), "--out", str(tmp_path / "out"), "--progress", "none"])
    error = capsys.readouterr().err
    assert code == 2, error
    return error


def test_bad_adaptation_and_path_options_exit_2(tmp_path, capsys, mind_models, sphere_case):
    image, _ = sphere_case
    run = ("run", "--volume", image, "--model", mind_models)
    assert "--adapt-lr must be > 0, got -1.0" in failing(tmp_path, capsys, *run, "--adapt", "tent", "--adapt-lr", "-1")
    assert "--method ensemble runs every model" in failing(tmp_path, capsys, *run, "--adapt", "dsbr", "--method", "ensemble")
    assert "invalid choice: 'sgd'" in failing(tmp_path, capsys, *run, "--adapt", "sgd")
    assert "exactly two site models; 3 were given" in failing(tmp_path, capsys, "path", "--volume", image, "--model", mind_models)
    two = ("--model", mind_models / "site0.json", "--model", mind_models / "site1.json")
    assert "--steps must be at least 2 (the two endpoints), got 1" in failing(tmp_path, capsys, "path", "--volume", image, *two, "--steps", "1")


def test_path_marks_endpoints_mean_and_adaptive_weight(tmp_path, mind_models, sphere_case):
    image, labels = sphere_case
    a, b = mind_models / "site0.json", mind_models / "site2.json"
    summary = cli(tmp_path, "path", "--volume", image, "--model", a, "--model", b, "--reference", labels, "--steps", "3")
    path = summary["path"]
    points = {tuple(p["markers"]): p for p in path["points"]}
    lambdas = [p["lambda"] for p in path["points"]]
    assert lambdas == sorted(lambdas) and lambdas[0] == 0.0 and lambdas[-1] == 1.0 and 0.5 in lambdas
    assert points[("A",)]["lambda"] == 0.0 and points[("B",)]["lambda"] == 1.0
    assert any("adaptive" in markers and p["lambda"] == path["adaptive_alpha_b"] for markers, p in points.items())
    # the marked coefficient is alpha_B of the adaptive merge of the two models
    adaptive = cli(tmp_path / "adaptive", "run", "--volume", image, "--model", a, "--model", b)
    assert path["adaptive_alpha_b"] == pytest.approx(adaptive["coefficients"]["body"]["site2"], abs=1e-6)
    # lambda = 0 is model A itself: the same Dice as model A alone
    single = cli(tmp_path / "single", "run", "--volume", image, "--model", a, "--reference", labels)
    assert points[("A",)]["evaluation"]["mean_dice"] == pytest.approx(single["evaluation"]["mean_dice"])
    rows = (tmp_path / "out" / "path.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("lambda,weight_site0,weight_site2,marker,probe_entropy,") and "mean_dice" in rows[0]
    assert len(rows) == 1 + len(lambdas) and rows[1].split(",")[3] == "A" and rows[-1].split(",")[3] == "B"
    picture = matplotlib.image.imread(tmp_path / "out" / "path.png")
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 500
    assert summary["path"]["entropy_barrier"] >= 0.0 and "dice_barrier" in summary["path"]
