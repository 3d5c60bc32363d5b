"""Entropy-adaptive merging: alpha follows uncertainty, the head gets its own beta, choices are deterministic."""

import numpy as np
import pytest
import torch

from conftest import make_card
from entropymerge.entropy import class_balanced_entropy, js_divergence_to_mean, probe_statistics
from entropymerge.errors import UserInputError
from entropymerge.head import detect_head, head_probabilities
from entropymerge.merging import adaptive_plan, softmax_coefficients
from entropymerge.models import SiteModel, load_site_model
from entropymerge.probe import apply_batchnorm_policy, body_mask, probe_probabilities, select_probe
from entropymerge.safeconfig import build_network
from entropymerge.settings import MergeSettings
from entropymerge.weights import merged_network

LAST_CONV = "model.2.1.conv.unit0.conv"  # the final conv of a MONAI UNet with residual units


def scaled_head(model: SiteModel, factor: float, name: str) -> SiteModel:
    """The same model with its logits multiplied by ``factor`` (sharper above 1, flatter below)."""
    network = build_network(model.card.network, "test")
    network.load_state_dict(model.state_dict())
    conv = dict(network.named_modules())[LAST_CONV]
    with torch.no_grad():
        conv.weight.mul_(factor)
        conv.bias.mul_(factor)
    return SiteModel(name, model.source, model.card, network.eval(), "weights")


def phantom_probe_inputs(size=(48, 48, 48)) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij"))
    body = ((grid ** 2).sum(0) < 0.5).float()
    organ = (((grid[0] - 0.2) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.1).float()
    return (0.2 * body + 0.6 * organ + 0.02 * torch.randn(size, generator=torch.Generator().manual_seed(0)))[None, None]


@pytest.fixture
def base_model(model_factory):
    return load_site_model(model_factory("base", seed=4))


def plan_for(models, settings=MergeSettings(), inputs=None):
    inputs = phantom_probe_inputs() if inputs is None else inputs
    probe = select_probe(inputs, (32, 32, 32), max_patches=3)
    outputs = [probe_probabilities(m.network, probe, torch.device("cpu")) for m in models]
    return adaptive_plan(models, probe, outputs, settings, torch.device("cpu")), outputs


def test_lower_entropy_model_gets_larger_alpha(base_model):
    models = [scaled_head(base_model, f, n) for f, n in ((0.2, "unsure"), (1.0, "plain"), (5.0, "confident"))]
    plan, outputs = plan_for(models, MergeSettings(statistic="entropy"))
    entropies = probe_statistics(outputs)["entropy"]
    assert entropies[0] > entropies[1] > entropies[2]
    assert plan.body[2] > plan.body[1] > plan.body[0]
    assert plan.body.min() >= 0 and plan.body.sum() == pytest.approx(1.0)
    assert plan.head.min() >= 0 and plan.head.sum() == pytest.approx(1.0)


def test_decoupled_head_coefficients_differ_from_alpha(model_factory):
    models = [load_site_model(model_factory(f"m{i}", seed=10 + i)) for i in range(3)]
    # a softmax statistic: trimmed_mean would give both body and head 1/K
    plan, _ = plan_for(models, MergeSettings(temperature=0.02, statistic="foreground_entropy"))
    assert plan.details["head_module"] == "model.2"
    assert not np.allclose(plan.head, plan.body, atol=1e-3)
    assert plan.head_keys and all(key.startswith("model.2.") for key in plan.head_keys)
    undecoupled, _ = plan_for(models, MergeSettings(temperature=0.02, statistic="foreground_entropy", decouple_head=False))
    assert undecoupled.head is None and not undecoupled.head_keys
    np.testing.assert_allclose(undecoupled.body, plan.body)


def test_merge_is_deterministic(model_factory):
    models = [load_site_model(model_factory(f"m{i}", seed=20 + i)) for i in range(3)]
    first, _ = plan_for(models)
    second, _ = plan_for(models)
    np.testing.assert_array_equal(first.body, second.body)
    np.testing.assert_array_equal(first.head, second.head)


def test_refine_keeps_the_lowest_uncertainty_candidate(model_factory, base_model):
    models = [scaled_head(base_model, 0.3, "unsure"), scaled_head(base_model, 4.0, "sharp")]
    plan, _ = plan_for(models, MergeSettings(refine=True))
    candidates = plan.details["candidates"]
    assert {c["candidate"] for c in candidates} >= {"adaptive", "mean", "only unsure", "only sharp"}
    best = min(candidates, key=lambda c: c["score"])
    assert plan.details["chosen_candidate"] == best["candidate"]
    np.testing.assert_allclose(plan.body, best["body"], atol=1e-6)


@pytest.mark.parametrize("statistic", ["cross_entropy", "shrunk_cross_entropy"])
def test_refine_scores_candidates_by_foreground_entropy_when_the_statistic_compares_models(base_model, statistic):
    # one merged candidate has no "others" to compare with: its consensus cross-entropy would be 0 for all
    models = [scaled_head(base_model, 0.3, "unsure"), scaled_head(base_model, 4.0, "sharp")]
    plan, _ = plan_for(models, MergeSettings(statistic=statistic, refine=True))
    scores = [c["score"] for c in plan.details["candidates"]]
    assert plan.details["refine_criterion"] == "foreground_entropy" and len(set(scores)) > 1
    assert plan.details["chosen_candidate"] == min(plan.details["candidates"], key=lambda c: c["score"])["candidate"]


def test_softmax_coefficients_and_temperature():
    alpha = softmax_coefficients([0.1, 0.2, 0.4], 0.1)
    assert alpha.sum() == pytest.approx(1.0) and list(np.argsort(-alpha)) == [0, 1, 2]
    np.testing.assert_allclose(softmax_coefficients([0.3, 0.3], 0.05), [0.5, 0.5])
    sharper = softmax_coefficients([0.1, 0.2], 0.01)
    assert sharper[0] > alpha[0]
    with pytest.raises(UserInputError, match="temperature must be > 0"):
        softmax_coefficients([0.1, 0.2], 0.0)


def test_probe_patches_lie_in_the_body_and_are_spread():
    inputs = torch.zeros(1, 2, 96, 64, 64)
    inputs[0, 0, 10:90, 8:56, 8:56] = 1.0  # the body; the rest is air
    probe = select_probe(inputs, (32, 32, 32), max_patches=3)
    assert probe.patches.shape == (3, 2, 32, 32, 32)
    for patch in probe.patches:
        assert patch[0].mean() > 0.5, "probe patches should cover the body"
    distances = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(probe.origins) for b in probe.origins[i + 1:]]
    assert min(distances) >= 16
    assert select_probe(inputs, (32, 32, 32), max_patches=3).origins == probe.origins


def test_probe_larger_than_the_volume_shrinks_to_the_volume_rounded_up_to_the_network_multiple():
    inputs = torch.rand(1, 1, 20, 40, 40)
    probe = select_probe(inputs, (64, 32, 32), max_patches=50, multiple=(8, 8, 8))
    assert probe.patches.shape[2:] == (24, 32, 32)  # 20 -> 24: padded by 4 edge voxels, not up to 64
    assert torch.equal(probe.patches[0, 0, 20:], probe.patches[0, 0, 19:20].expand(4, 32, 32))
    assert any("holds only" in note and "instead of 50" in note for note in probe.notes)
    assert not any("rounded" in note for note in probe.notes)
    whole = select_probe(inputs, (32, 32, 32), mode="whole", multiple=(16, 16, 16))
    assert whole.patches.shape == (1, 1, 16, 32, 32)


def test_a_probe_size_the_network_cannot_take_is_rounded_up_with_a_note():
    inputs = torch.rand(1, 1, 64, 64, 64)
    probe = select_probe(inputs, (30, 30, 20), max_patches=2, multiple=(8, 8, 8))
    assert probe.patches.shape[2:] == (32, 32, 24)
    assert any("(30, 30, 20) rounded up to (32, 32, 24)" in note and "(8, 8, 8)" in note for note in probe.notes)


def test_body_mask_handles_bright_backgrounds():
    image = torch.ones(30, 30, 30)
    image[10:20, 10:20, 10:20] = 0.2
    mask = body_mask(image)
    assert mask[15, 15, 15] and not mask[0, 0, 0]


def test_head_detection_on_a_monai_unet_and_card_override(base_model):
    head = detect_head(base_model.network, 3)
    assert head.module_name == "model.2"
    assert head.keys == {k for k in base_model.state_dict() if k.startswith("model.2.")}
    override = detect_head(base_model.network, 3, ("model.2.1",))
    assert override.module_name == "model.2.1" and all(k.startswith("model.2.1.") for k in override.keys)
    with pytest.raises(UserInputError, match="'head' names modules that do not exist: classifier"):
        detect_head(base_model.network, 3, ("classifier",))


def test_each_head_on_a_one_hot_body_is_that_model_whatever_the_batch_size(model_factory):
    models = [load_site_model(model_factory(f"m{i}", seed=30 + i)) for i in range(2)]
    probe = select_probe(phantom_probe_inputs(), (32, 32, 32), max_patches=3)
    head = detect_head(models[0].network, models[0].card.num_classes)
    body = merged_network(models, [1.0, 0.0])
    alone = probe_probabilities(models[0].network, probe, torch.device("cpu"), batch_size=3)
    for batch_size in (1, 2, 3):  # calling the head module fires the capturing hook too: no stale head input
        heads = head_probabilities(body, head, models, probe, torch.device("cpu"), batch_size)
        assert [h.shape for h in heads] == [alone.shape] * 2
        torch.testing.assert_close(heads[0], alone)
        assert not torch.allclose(heads[1], alone), "the other head gives other outputs on the same features"


def test_head_detection_on_other_monai_networks():
    from monai.networks.nets import BasicUNet, DynUNet

    dyn = DynUNet(3, 1, 4, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2])
    assert detect_head(dyn, 4).module_name == "output_block.conv.conv"
    basic = BasicUNet(3, 1, 4, features=(4, 4, 8, 8, 16, 8))
    assert detect_head(basic, 4).module_name == "final_conv"


def test_batchnorm_statistics_can_be_reestimated_on_the_probe():
    card = make_card()
    network = build_network(dict(card.network, norm="batch"), "test").eval()
    probe = select_probe(phantom_probe_inputs(), (32, 32, 32), max_patches=2)
    norm = next(m for m in network.modules() if isinstance(m, torch.nn.BatchNorm3d))
    before = norm.running_mean.clone()
    apply_batchnorm_policy(network, probe, "merge", torch.device("cpu"))
    torch.testing.assert_close(norm.running_mean, before)
    apply_batchnorm_policy(network, probe, "reestimate", torch.device("cpu"))
    assert not torch.allclose(norm.running_mean, before) and not network.training
    with pytest.raises(UserInputError, match="unknown batch-norm policy"):
        apply_batchnorm_policy(network, probe, "ignore", torch.device("cpu"))


def test_class_balanced_entropy_weights_each_predicted_class_equally():
    # 3 voxels: two confident background voxels (entropy 0), one uncertain foreground voxel (entropy 1)
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.4, 0.6]]).T.reshape(1, 2, 3, 1, 1)
    p[0, :, 2] = torch.tensor([0.5, 0.5]).reshape(2, 1, 1) + torch.tensor([-1e-4, 1e-4]).reshape(2, 1, 1)
    assert class_balanced_entropy(p) == pytest.approx(0.5, abs=1e-3)  # (0 + 1) / 2, not 1/3


def test_disagreement_is_zero_for_identical_models_and_grows_with_difference():
    p = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert js_divergence_to_mean([p, p]) == pytest.approx([0.0, 0.0], abs=1e-6)
    flipped = p.flip(1)
    assert min(js_divergence_to_mean([p, flipped])) > 0.01
