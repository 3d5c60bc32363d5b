"""Forward-only statistics that resist a confidently wrong site (issue 12, item 3), on constructed outputs.

Each case builds the softmax outputs K site models give on one probe, with a known truth: two
sites that see the organ, and a third that is confidently wrong in a chosen way.
"""

import math

import numpy as np
import pytest
import torch

from entropymerge.entropy import foreground_weights, leave_one_out_consensus, prediction_bias, probe_statistics
from entropymerge.fingerprint import FINGERPRINT_KEY, QUANTILES, fingerprint_distances, intensity_fingerprint
from entropymerge.merging import STATISTICS, shrink_toward_mean, site_scores, statistic_coefficients, trimmed_mean
from entropymerge.settings import MergeSettings

ROBUST = ("cross_entropy", "entropy_kl", "cross_entropy_bias", "shrunk_cross_entropy")


def organ_mask(size=16) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    return ((grid ** 2).sum(0) < 0.4)[None]  # (1, X, Y, Z)


def outputs_from_labels(labels: torch.Tensor, confidence: float, classes: int = 2) -> torch.Tensor:
    """Softmax output (1, C, X, Y, Z) that gives ``confidence`` to ``labels`` and shares the rest."""
    one_hot = torch.nn.functional.one_hot(labels.long(), classes).permute(0, 4, 1, 2, 3).float()
    return one_hot * confidence + (1 - one_hot) * (1 - confidence) / (classes - 1)


def sites_with_one_wrong(wrong: str) -> list[torch.Tensor]:
    """Two sites that find the organ with moderate confidence (0.8), and a third, confidently wrong one (0.99)."""
    organ = organ_mask()
    right = outputs_from_labels(organ, 0.8)
    wrong_labels = {"empty": torch.zeros_like(organ), "inverted": ~organ}[wrong]
    return [right, right.clone(), outputs_from_labels(wrong_labels, 0.99)]


@pytest.mark.parametrize("wrong", ["empty", "inverted"])
def test_a_confidently_wrong_site_wins_with_entropy_but_not_with_the_robust_statistics(wrong):
    stats = probe_statistics(sites_with_one_wrong(wrong))
    # The failure the issue describes: the wrong site is the most certain, so entropy trusts it most.
    assert int(np.argmax(statistic_coefficients(stats, "foreground_entropy", 0.05))) == 2
    for statistic in ROBUST:
        alpha = statistic_coefficients(stats, statistic, 0.05)
        assert alpha[2] < min(alpha[0], alpha[1]), (statistic, alpha)
        assert alpha[0] == pytest.approx(alpha[1])
    default = statistic_coefficients(stats, MergeSettings().statistic, 0.05)
    assert default[2] < 0.1 and default.sum() == pytest.approx(1.0)


def test_prediction_bias_lets_class_balanced_entropy_reject_a_site_that_finds_nothing_but_not_an_inverted_one():
    empty = statistic_coefficients(probe_statistics(sites_with_one_wrong("empty")), "biased_entropy", 0.05)
    assert empty[2] < min(empty[:2])
    # Inverted, the wrong site's certainty (entropy 0.08 vs 0.72) outweighs its bias: a known weakness.
    inverted = statistic_coefficients(probe_statistics(sites_with_one_wrong("inverted")), "biased_entropy", 0.05)
    assert inverted[2] > 0.9


@pytest.mark.parametrize("statistic", list(STATISTICS))
def test_identical_models_get_equal_weights(statistic):
    p = torch.softmax(torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    stats = probe_statistics([p, p.clone(), p.clone()])
    stats["fingerprint_distance"] = [0.1] * 3  # the same training data
    alpha = statistic_coefficients(stats, statistic, 0.05)
    np.testing.assert_allclose(alpha, [1 / 3] * 3, atol=1e-9)


def test_consensus_cross_entropy_is_entropy_of_the_others_plus_kl():
    generator = torch.Generator().manual_seed(2)
    outputs = [torch.softmax(3 * torch.randn(1, 3, 4, 4, 4, generator=generator), dim=1) for _ in range(3)]
    others = (outputs[1] + outputs[2]) / 2
    entropy = -(others * others.log()).sum(1)
    kl = (others * (others.log() - outputs[0].log())).sum(1)
    expected = float(((entropy + kl) / math.log(3)).mean())
    cross_entropies, divergences = leave_one_out_consensus(outputs)
    assert cross_entropies[0] == pytest.approx(expected, rel=1e-4)
    assert divergences[0] == pytest.approx(float((kl / math.log(3)).mean()), rel=1e-3)
    weights = foreground_weights(outputs)
    weighted = float((((entropy + kl) / math.log(3)) * weights).sum() / weights.sum())
    assert leave_one_out_consensus(outputs, weights)[0][0] == pytest.approx(weighted, rel=1e-4)


def test_prediction_bias_is_zero_for_agreeing_models_and_large_for_one_that_finds_nothing():
    right, right_again, empty = sites_with_one_wrong("empty")
    assert prediction_bias([right, right_again]) == pytest.approx([0.0, 0.0], abs=1e-9)
    biases = prediction_bias([right, right_again, empty])
    # the right sites' "others" include the empty one, so they carry some bias too, but much less
    assert biases[2] > 3.0 and max(biases[:2]) < 0.75


def test_shrinkage_keeps_alpha_when_models_agree_and_reaches_the_mean_when_they_disagree_fully():
    np.testing.assert_allclose(shrink_toward_mean([0.7, 0.2, 0.1], [0.0, 0.0, 0.0]), [0.7, 0.2, 0.1])
    np.testing.assert_allclose(shrink_toward_mean([0.7, 0.2, 0.1], [1.0, 1.0, 1.0]), [1 / 3] * 3)
    halfway = shrink_toward_mean([1.0, 0.0], [0.5, 0.5])
    np.testing.assert_allclose(halfway, [0.75, 0.25])


def test_shrunk_statistic_moves_toward_the_mean_by_the_measured_disagreement():
    stats = probe_statistics(sites_with_one_wrong("inverted"))
    plain = statistic_coefficients(stats, "cross_entropy", 0.05)
    shrunk = statistic_coefficients(stats, "shrunk_cross_entropy", 0.05)
    agreement = 1 - np.mean(stats["disagreement"])
    assert 0 < agreement < 1
    np.testing.assert_allclose(shrunk, agreement * plain + (1 - agreement) / 3)


def test_unknown_statistic_is_a_user_error_naming_the_choices():
    from entropymerge.errors import UserInputError

    with pytest.raises(UserInputError, match="unknown statistic 'median'.*cross_entropy"):
        site_scores(probe_statistics(sites_with_one_wrong("empty")), "median")


def test_intensity_fingerprint_is_the_quantiles_inside_the_body():
    image = torch.zeros(20, 20, 20)
    image[5:15, 5:15, 5:15] = torch.linspace(0.5, 1.0, 1000).reshape(10, 10, 10)
    fingerprint = intensity_fingerprint(image)
    assert len(fingerprint) == len(QUANTILES) == 19
    np.testing.assert_allclose(fingerprint, 0.5 + 0.5 * np.array(QUANTILES), atol=1e-3)  # air is left out
    assert intensity_fingerprint(image[None].repeat(2, 1, 1, 1)) == pytest.approx(fingerprint, abs=1e-4)


def test_fingerprint_distance_prefers_the_site_whose_training_intensities_match_and_needs_every_card():
    target = [0.1 * i for i in range(19)]
    cards = [{FINGERPRINT_KEY: target}, {FINGERPRINT_KEY: [v + 0.2 for v in target]}, {FINGERPRINT_KEY: list(reversed(target))}]
    distances = fingerprint_distances(cards, target)
    assert distances[0] == 0.0 and distances[1] == pytest.approx(0.2) and distances[2] > 0.5
    assert fingerprint_distances([*cards, {"recipe": "no fingerprint"}], target) is None
    stats = probe_statistics(sites_with_one_wrong("empty"))
    from entropymerge.errors import UserInputError

    with pytest.raises(UserInputError, match="intensity fingerprint .* in every model card"):
        site_scores(stats, "fingerprint")
    stats["fingerprint_distance"] = distances
    assert int(np.argmax(statistic_coefficients(stats, "fingerprint", 0.05))) == 0


def test_trimmed_mean_drops_only_a_site_far_off_the_others():
    # Scores measured with the bundled sample (four DropGen sites and northgate-t2 on lowfield-t1): the silent
    # site's consensus cross-entropy + bias is about 7x the others'; the four alike sites keep 1/4 each.
    np.testing.assert_allclose(trimmed_mean([0.975, 1.141, 1.125, 0.924, 7.693]), [0.25, 0.25, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(trimmed_mean([0.975, 1.141, 1.125, 0.924]), [0.25] * 4)  # small differences: the mean merge
    np.testing.assert_allclose(trimmed_mean([1.0, 1.05, 1.1, 1.3]), [0.25] * 4)  # above 3 MADs but within half the median
    assert trimmed_mean([0.2, 0.2, 5.0])[2] == 0.0  # the lowest score is never the outlier: only high scores are dropped


def test_trimmed_mean_statistic_rejects_a_confidently_wrong_site():
    for wrong in ("empty", "inverted"):
        alpha = statistic_coefficients(probe_statistics(sites_with_one_wrong(wrong)), "trimmed_mean", 0.05)
        np.testing.assert_allclose(alpha, [0.5, 0.5, 0.0])
