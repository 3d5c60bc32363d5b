"""Transferability ranking: the scores' behaviour, weighted Kendall tau by hand, taps, and the CLI."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from entropymerge.cli import main
from entropymerge.models import load_site_model
from entropymerge.probe import Probe
from entropymerge.ranking import LabelSource, labelled_agreement, rank_models
from entropymerge.settings import MergeSettings
from entropymerge.taps import Tap, TappedOutputs, features_at, find_taps, tapped_pass
from entropymerge.transferability import (
    UNLABELLED,
    decoder_stage_weights,
    encoder_stage_weights,
    fuse,
    fusion_weight,
    grtd,
    lbtc,
    logme,
    sample_voxels,
    weighted_kendall_tau,
    weighted_kendall_tau_multiplicative,
)
from entropymerge.volume import Geometry, read_volume, write_volume

SIZES = (700, 150, 40, 20)


def clustered_features(overlap: float, seed: int = 0):
    """Four classes as Gaussian clusters whose centres shrink together as ``overlap`` goes 0 -> 1."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(SIZES)])
    centres = rng.normal(0, 1, (4, 16)) * 4
    features = (1 - overlap) * centres[labels] + rng.normal(0, 1, (len(labels), 16))
    anchors = rng.choice(np.flatnonzero(labels > 0), 50, replace=False)
    rest = np.setdiff1d(np.arange(len(labels)), anchors)
    return features, labels, anchors, rest


@pytest.mark.parametrize("score", ["grtd", "lbtc"])
def test_scores_are_best_for_separated_classes_and_degrade_as_they_mix(score):
    values = []
    for overlap in (0.0, 0.4, 0.7, 1.0):
        features, labels, anchors, rest = clustered_features(overlap)
        if score == "grtd":
            values.append(grtd(features, labels, np.random.default_rng(0))[0])
        else:
            values.append(lbtc(features[rest], labels[rest], features[anchors], labels[anchors]))
    assert values[0] >= 0.9 and values[0] == max(values), values
    assert all(a >= b for a, b in zip(values, values[1:])), f"{score} must not rise as classes mix: {values}"
    assert values[-1] < values[0] - 0.3, f"{score} must fall clearly once the classes overlap: {values}"


def test_grtd_reports_every_class_and_lbtc_is_one_for_pure_neighbourhoods():
    features, labels, anchors, rest = clustered_features(0.0)
    score, per_class = grtd(features, labels, np.random.default_rng(0))
    assert set(per_class) == {0, 1, 2, 3} and score == pytest.approx(np.mean(list(per_class.values())))
    separated = np.concatenate([np.zeros((40, 2)), np.full((40, 2), 100.0)]) + np.random.default_rng(1).normal(0, 0.1, (80, 2))
    two = np.repeat([0, 1], 40)
    assert lbtc(separated, two, separated[:3], two[:3], neighbours=5) == 1.0


def test_logme_prefers_informative_features():
    informative, labels, _, _ = clustered_features(0.0)
    noise = np.random.default_rng(3).normal(0, 1, informative.shape)
    assert logme(informative, labels) > logme(noise, labels) + 0.5


@pytest.mark.parametrize("classes,expected", [(1, 0.0), (2, math.tanh(math.log(2) / 2)), (3, 0.5), (10, math.tanh(math.log(10) / 2))])
def test_fusion_weight_follows_tanh_of_log_cardinality(classes, expected):
    assert fusion_weight(classes) == pytest.approx(expected)


def test_fusion_mixes_min_max_normalised_scores():
    fused = fuse([0.2, 0.4, 0.6], [0.9, 0.5, 0.1], foreground_classes=3)  # a = 0.5
    np.testing.assert_allclose(fused, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(fuse([0.2, 0.4, 0.6], [0.1, 0.2, 0.3], 1), [0.0, 0.5, 1.0])  # a = 0: LBTC only


def test_weighted_kendall_tau_by_hand():
    truth = [0.9, 0.8, 0.1]  # true ranks 0, 1, 2 -> weights 1, 1/2, 1/3; a pair weighs the sum of its two
    assert weighted_kendall_tau([3, 2, 1], truth) == pytest.approx(1.0)
    assert weighted_kendall_tau([1, 2, 3], truth) == pytest.approx(-1.0)
    # swapping the top two: (-1.5 + 4/3 + 5/6) / (1.5 + 4/3 + 5/6) = 2/11
    assert weighted_kendall_tau([2, 3, 1], truth) == pytest.approx(2 / 11)
    # swapping the bottom two costs less: (1.5 + 4/3 - 5/6) / (11/3) = 6/11
    assert weighted_kendall_tau([3, 1, 2], truth) == pytest.approx(6 / 11)


def test_topote_multiplicative_weighted_tau_by_hand():
    truth = [0.1, 0.9, 0.8]  # true order: items 1, 2, 0 -> weights 1, 1/2, 1/3; a pair weighs the product of its two
    assert weighted_kendall_tau_multiplicative([0, 3, 2], truth) == pytest.approx(1.0)
    assert weighted_kendall_tau_multiplicative([3, 1, 2], truth) == pytest.approx(-1.0)
    # pair weights: top two 1/2, first and last 1/3, bottom two 1/6 (sum 1)
    assert weighted_kendall_tau_multiplicative([2, 1, 3], truth) == pytest.approx(-2 / 3)  # only the bottom pair right: 1 - 2 * 5/6
    assert weighted_kendall_tau_multiplicative([0, 2, 3], truth) == pytest.approx(0.0)  # top two swapped: 1 - 2 * 1/2
    assert weighted_kendall_tau_multiplicative([2, 3, 1], truth) == pytest.approx(2 / 3)  # bottom two swapped: 1 - 2 * 1/6
    assert weighted_kendall_tau_multiplicative([1, 1, 1], truth) == pytest.approx(1.0), "ties count as concordant, as in TopoTE's code"
    # the two variants agree on the direction and differ in how much a top swap costs
    assert weighted_kendall_tau([0, 2, 3], truth) == pytest.approx(2 / 11)


def test_sampling_respects_budgets_classes_and_unlabelled_voxels():
    labels = np.full((40, 40, 20), UNLABELLED)
    labels[:30] = 0
    labels[5:25, 5:25, 5:15] = 1
    labels[10:12, 10:12, 8:10] = 2  # tiny structure: 8 voxels
    sample = sample_voxels(labels, np.random.default_rng(0), foreground_budget=100, background_budget=500)
    flat = labels.reshape(-1)
    assert (flat[sample.indices] != UNLABELLED).all()
    counts = {c: int((sample.labels == c).sum()) for c in (0, 1, 2)}
    assert counts[0] == 500 and counts[2] == 8 and 90 <= counts[1] <= 110
    anchors = np.stack(np.unravel_index(sample.anchor_indices, labels.shape), 1)
    assert len(anchors) == 50 and all(labels[tuple(a)] in (1, 2) for a in anchors)
    inner = np.zeros_like(labels, dtype=bool)
    inner[6:24, 6:24, 6:14] = True
    assert not any(inner[tuple(a)] and labels[tuple(a)] == 1 for a in anchors), "anchors lie on boundaries"
    again = sample_voxels(labels, np.random.default_rng(0), foreground_budget=100, background_budget=500)
    np.testing.assert_array_equal(again.indices, sample.indices)


def test_features_at_reads_coarse_maps_at_full_resolution_positions():
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).contiguous()  # value = x at half resolution
    positions = np.array([[0, 0, 0, 0], [0, 15, 3, 3], [0, 8, 8, 8]])
    values = features_at(ramp, positions, (16, 16, 16))[:, 0]
    # full-resolution voxel x maps to coarse coordinate (x + 0.5) / 2 - 0.5
    np.testing.assert_allclose(values, [0.0, 7.0, 3.75], atol=1e-5)


def test_taps_on_a_monai_unet_are_its_stages_weighted_like_topote(model_factory):
    model = load_site_model(model_factory("a"))
    taps = find_taps(model, torch.rand(1, 1, 32, 32, 32))
    # MONAI UNet: the down-sampling residual units, then the up-sampling block and the head's input
    assert taps.encoder == (Tap("model.0"), Tap("model.1.submodule.0"))
    assert taps.decoder == (Tap("model.1.submodule.2"), Tap("model.2", "input"))
    described = taps.describe()
    assert described["decoder"] == ["model.1.submodule.2", "model.2 (input)"] and described["decoder_weights"] == [0.5, 0.5]
    tapped = tapped_pass(model.network, torch.rand(2, 1, 32, 32, 32), taps, torch.device("cpu"), 1)
    assert [tuple(f.shape) for f in tapped.encoder_features] == [(2, 4, 16, 16, 16), (2, 8, 8, 8, 8)]
    assert [tuple(f.shape) for f in tapped.decoder_features] == [(2, 4, 16, 16, 16), (2, 8, 16, 16, 16)]


def test_taps_on_a_deeper_basic_unet_whose_last_decoder_stage_feeds_the_head(model_factory):
    """Four halvings (the detection pass needs 32 voxels); the last up-sampling block's output is the head's
    input, so it is not tapped twice."""
    spec = {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 16, 32, 4]}
    model = load_site_model(model_factory("deep", network=spec))
    taps = find_taps(model, torch.rand(1, 1, 32, 32, 32))
    assert taps.encoder == tuple(Tap(f"down_{i}") for i in (1, 2, 3, 4))
    assert taps.decoder == tuple(Tap(f"upcat_{i}") for i in (4, 3, 2, 1))


def test_stage_weights_are_topotes_paper_profile():
    # utils/fusion_weights.py of TopoTE: decoder 0.022 0.229 0.499 0.229 0.022; encoder 0.002 0.038 0.240 0.444 0.240 0.038
    np.testing.assert_allclose(decoder_stage_weights(5), [0.022, 0.229, 0.499, 0.229, 0.022], atol=0.002)
    np.testing.assert_allclose(encoder_stage_weights(6), [0.002, 0.038, 0.240, 0.444, 0.240, 0.038], atol=0.002)
    assert encoder_stage_weights(1) == pytest.approx([1.0]) and decoder_stage_weights(3).sum() == pytest.approx(1.0)


def test_taps_named_in_the_card(model_factory):
    from dataclasses import replace

    model = load_site_model(model_factory("a"))
    model.card = replace(model.card, feature_taps={"global": "model.1", "local": "model.0"})
    taps = find_taps(model, torch.rand(1, 1, 32, 32, 32))
    assert taps.encoder == (Tap("model.0"),) and taps.decoder == (Tap("model.1", "input"),)
    model.card = replace(model.card, feature_taps={"local": "encoder.7"})
    with pytest.raises(Exception, match="feature tap 'local' names a module that does not exist: encoder.7"):
        find_taps(model, torch.rand(1, 1, 32, 32, 32))


def scribbles_from(labels_path, tmp_path, unlabelled=255):
    """Two short strokes per class inside each structure (and the background) of the reference."""
    labels = read_volume(labels_path)
    scribbles = np.full(labels.geometry.shape, unlabelled, np.uint8)
    for value in np.unique(labels.array):
        where = np.argwhere(labels.array == value)
        for start in where[np.random.default_rng(int(value)).choice(len(where), 2, replace=False)]:
            for step in range(4):
                point = tuple(np.minimum(start + [step, 0, 0], np.array(labels.geometry.shape) - 1))
                if labels.array[point] == value:
                    scribbles[point] = value
    return write_volume(scribbles, labels.geometry, tmp_path / "scribbles.nii.gz")


def run_rank(tmp_path, *args) -> tuple[int, dict | None]:
    out = tmp_path / "rank"
    code = main(["rank", *map(str, args), "--out", str(out), "--progress", "none"])
    if code != 0:
        return code, None
    return code, json.loads((out / "ranking.json").read_text(encoding="utf-8"))


def test_rank_with_a_reference_gives_the_table_and_kendall_tau(tmp_path, mind_models, sphere_case, capsys):
    image, labels = sphere_case
    code, ranking = run_rank(tmp_path, "--volume", image, "--model", mind_models, "--reference", labels)
    assert code == 0
    printed = capsys.readouterr().out
    assert "AS IS (which site model can I trust on this case as it is?): ranked by true Dice (the truth)" in printed
    assert "TRANSFER (which site model would do best after fine-tuning on a few labels of this site?): ranked by fused; labels: reference" in printed
    assert "weighted Kendall tau vs true Dice (additive)" in printed and "weighted Kendall tau vs true Dice (multiplicative)" in printed
    assert ranking["label_source"] == "reference" and ranking["self_referenced"] is False
    assert [row["rank"] for row in ranking["rows"]] == [1, 2, 3]
    assert sorted(row["model"] for row in ranking["rows"]) == ["site0", "site1", "site2"]
    dice = [row["true_dice"] for row in ranking["rows"]]
    assert ranking["as_is_basis"] == "true_dice" and dice == sorted(dice, reverse=True), "with a reference the truth orders the rows"
    by_fused = sorted(ranking["rows"], key=lambda row: -row["fused"])
    assert [row["transfer_rank"] for row in by_fused] == [1, 2, 3]
    columns = {c["key"]: c for c in ranking["columns"]}
    assert columns["true_dice"]["question"] == "as is" and columns["true_dice"]["labels"] == "reference"
    assert columns["uncertainty"] == {"key": "uncertainty", "title": f"{MergeSettings.statistic} (merge statistic)", "question": "as is",
                                      "better": "lower", "labels": "none"}
    assert columns["fused"]["question"] == "transfer" and columns["fused"]["labels"].startswith("reference ")
    for row in ranking["rows"]:
        assert 0 <= row["grtd"] <= 1 and 0 <= row["lbtc"] <= 1 and 0 <= row["true_dice"] <= 1
        assert row["alpha"] is not None and row["entropy"] is not None
    assert set(ranking["weighted_kendall_tau"]) == {"additive", "multiplicative"}
    assert set(ranking["weighted_kendall_tau"]["multiplicative"]) == {"uncertainty", "entropy", "alpha", "fused", "grtd", "lbtc", "logme"}
    rows = list(csv.DictReader((tmp_path / "rank" / "ranking.csv").open()))
    assert [r["model"] for r in rows] == [r["model"] for r in ranking["rows"]]
    assert list(rows[0]) == ["rank", "model", "uncertainty", "entropy", "alpha", "true_dice", "transfer_rank", "fused", "grtd", "lbtc", "logme"]
    assert not (tmp_path / "rank" / "segmentation.nii.gz").exists(), "rank writes the ranking, not a segmentation"


def test_rank_from_scribbles_and_from_pseudo_labels(tmp_path, mind_models, sphere_case):
    image, labels = sphere_case
    scribbles = scribbles_from(labels, tmp_path)
    code, ranking = run_rank(tmp_path / "s", "--volume", image, "--model", mind_models, "--scribbles", scribbles)
    assert code == 0 and ranking["label_source"] == "scribbles" and ranking["weighted_kendall_tau"] is None
    painted = read_volume(scribbles).array
    assert set(ranking["samples"]["per_class"]) == {str(v) for v in np.unique(painted[painted != 255])}
    # only painted voxels are sampled; nearest resampling from 2.5 mm slices to the 2 mm model grid may repeat some
    assert ranking["samples"]["voxels"] <= 2 * int((painted != 255).sum())
    columns = {c["key"]: c for c in ranking["columns"]}
    assert ranking["as_is_basis"] == "scribble_dice" and columns["scribble_dice"]["labels"] == "scribbles"
    assert all(0 <= row["scribble_accuracy"] <= 1 for row in ranking["rows"])
    code, ranking = run_rank(tmp_path / "p", "--volume", image, "--model", mind_models)
    assert code == 0 and ranking["label_source"] == "pseudo-label" and ranking["self_referenced"] is True
    uncertainty = [row["uncertainty"] for row in ranking["rows"]]
    assert ranking["as_is_basis"] == "uncertainty" and uncertainty == sorted(uncertainty), "without labels the label-free score leads"


def test_run_rank_reuses_the_probe_passes(tmp_path, mind_models, sphere_case, monkeypatch):
    import entropymerge.ranking as ranking_module
    import entropymerge.stages as stages
    import entropymerge.taps as taps_module

    calls = {"probe stage": 0, "ranking": 0}
    original = taps_module.tapped_pass

    def counting(where):
        def wrapper(*args, **kwargs):
            calls[where] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(stages, "tapped_pass", counting("probe stage"))
    monkeypatch.setattr(ranking_module, "tapped_pass", counting("ranking"))
    image, _ = sphere_case
    code = main(["run", "--volume", str(image), "--model", str(mind_models), "--rank", "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 0
    assert calls == {"probe stage": 3, "ranking": 0}, "one tapped probe pass per site model, none repeated by the ranking"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["ranking"]["label_source"] == "pseudo-label"
    assert [r["alpha"] for r in sorted(summary["ranking"]["rows"], key=lambda r: r["model"])] == pytest.approx(
        list(summary["coefficients"]["body"].values()), abs=1e-5)


def test_ranking_bad_inputs(tmp_path, mind_models, sphere_case, model_factory, capsys):
    image, labels = sphere_case
    one = sorted(mind_models.glob("*.json"))[0]
    assert run_rank(tmp_path, "--volume", image, "--model", one)[0] == 2
    assert "needs at least two models; 1 given" in capsys.readouterr().err
    geometry = read_volume(labels).geometry
    empty = write_volume(np.full(geometry.shape, 255, np.uint8), geometry, tmp_path / "empty.nii.gz")
    assert run_rank(tmp_path, "--volume", image, "--model", mind_models, "--scribbles", empty)[0] == 2
    assert "hold no painted voxels" in capsys.readouterr().err
    one_class = np.full(geometry.shape, 255, np.uint8)
    one_class[10, 10, 10] = 1
    path = write_volume(one_class, geometry, tmp_path / "one.nii.gz")
    assert run_rank(tmp_path, "--volume", image, "--model", mind_models, "--scribbles", path)[0] == 2
    assert "paint at least two classes" in capsys.readouterr().err
    other_grid = Geometry((5, 5, 5), (1, 1, 1), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    other = write_volume(np.zeros((5, 5, 5), np.uint8), other_grid, tmp_path / "o.nii.gz")
    assert run_rank(tmp_path, "--volume", image, "--model", mind_models, "--scribbles", other)[0] == 2
    assert "not on the target volume's grid" in capsys.readouterr().err
    strange = np.full(geometry.shape, 255, np.uint8)
    strange[5, 5, 5], strange[6, 6, 6] = 0, 9
    path = write_volume(strange, geometry, tmp_path / "strange.nii.gz")
    assert run_rank(tmp_path, "--volume", image, "--model", mind_models, "--scribbles", path)[0] == 2
    assert "values [9] that are neither classes" in capsys.readouterr().err


def constructed_outputs(labels: np.ndarray, right: bool, confidence: float, taps, seed: int):
    """Tapped outputs of a model whose prediction is the label map (``right``) or its classes rolled by one,
    with ``confidence`` on the predicted class; features are noise (only the as-is columns are checked)."""
    classes = 3
    predicted = labels if right else (labels + 1) % classes
    probabilities = torch.full((*labels.shape[:1], classes, *labels.shape[1:]), (1 - confidence) / (classes - 1))
    probabilities.scatter_(1, torch.from_numpy(predicted).long().unsqueeze(1), confidence)
    generator = torch.Generator().manual_seed(seed)
    decoder = [torch.randn(labels.shape[0], 4, 8, 8, 8, generator=generator) for _ in taps.decoder]
    encoder = [torch.randn(labels.shape[0], 4, 8, 8, 8, generator=generator) for _ in taps.encoder]
    return TappedOutputs(probabilities, decoder, encoder)


def test_as_is_scores_rank_the_model_that_is_right_on_the_scribbles_first(model_factory):
    """Constructed case: model 'wrong' is confidently wrong on every labelled voxel, 'right' is right but
    less confident. Scribbles and the reference put 'right' first; the label-free statistic orders by
    the uncertainty the caller gives (lower first), whatever the features say."""
    models = [load_site_model(model_factory(name, seed)) for seed, name in enumerate(("wrong", "right"))]
    truth = np.zeros((16, 16, 16), np.int64)
    truth[4:12, 4:12, 4:8], truth[4:12, 4:12, 9:12] = 1, 2
    probe = Probe(torch.rand(1, 1, 16, 16, 16), [(0, 0, 0)], "patches")
    taps = find_taps(models[0], probe.patches)
    tapped = [constructed_outputs(truth[None], False, 0.95, taps, 0), constructed_outputs(truth[None], True, 0.7, taps, 1)]
    scribbles = np.full(truth.shape, UNLABELLED)
    scribbles[6:9, 6, 5], scribbles[6:9, 6, 10], scribbles[1, 1:5, 1] = 1, 2, 0

    ranking = rank_models(models, probe.patches, probe, LabelSource("scribbles", scribbles, "scribbles"), torch.device("cpu"), tapped)
    rows = {row["model"]: row for row in ranking.rows}
    assert ranking.as_is_basis == "scribble_dice" and [row["model"] for row in ranking.rows] == ["right", "wrong"]
    assert (rows["right"]["scribble_accuracy"], rows["right"]["scribble_dice"]) == (1.0, 1.0)
    assert (rows["wrong"]["scribble_accuracy"], rows["wrong"]["scribble_dice"]) == (0.0, 0.0)

    reference = LabelSource("reference", truth, "reference")
    ranking = rank_models(models, probe.patches, probe, reference, torch.device("cpu"), tapped, uncertainty=[0.1, 0.3], true_dice=[0.2, 0.9])
    assert ranking.as_is_basis == "true_dice" and [row["model"] for row in ranking.rows] == ["right", "wrong"]
    # the confidently wrong model has the lower uncertainty: the label-free score ranks it against the truth
    assert ranking.kendall_tau["additive"]["uncertainty"] == -1.0 and ranking.kendall_tau["multiplicative"]["uncertainty"] == -1.0
    assert any("the label-free as-is score ranks against the true Dice (weighted tau -1.00)" in note for note in ranking.notes)
    assert "note: on this case the label-free as-is score ranks against the true Dice" in ranking.table()

    pseudo = LabelSource("pseudo-label", truth, "merged prediction")
    ranking = rank_models(models, probe.patches, probe, pseudo, torch.device("cpu"), tapped, uncertainty=[0.4, 0.2], statistic="consensus")
    assert ranking.as_is_basis == "uncertainty" and [row["model"] for row in ranking.rows] == ["right", "wrong"]
    assert ranking.kendall_tau is None and ranking.columns()[2]["title"] == "consensus (merge statistic)"
    assert sorted(row["transfer_rank"] for row in ranking.rows) == [1, 2]


def test_labelled_agreement_counts_only_labelled_voxels():
    labels = np.full((1, 4, 1, 1), UNLABELLED)
    labels[0, :3, 0, 0] = [0, 1, 1]
    probabilities = torch.zeros(1, 2, 4, 1, 1)
    probabilities[0, 1, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0, 1.0])  # predicts 1, 1, 0, 1 (the last voxel is not labelled)
    probabilities[0, 0] = 1 - probabilities[0, 1]
    accuracy, dice = labelled_agreement(probabilities, labels)
    assert accuracy == pytest.approx(1 / 3) and dice == pytest.approx(2 * 1 / (2 + 2))


def test_minimum_spanning_tree_is_minimal_and_joins_duplicates_at_zero_cost():
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial.distance import cdist

    from entropymerge.transferability import minimum_spanning_tree_edges

    points = np.random.default_rng(4).normal(size=(60, 5))
    distances = cdist(points, points)
    rows, cols = minimum_spanning_tree_edges(distances)
    assert len(rows) == 59 and len(set(rows) | set(cols)) == 60
    assert distances[rows, cols].sum() == pytest.approx(minimum_spanning_tree(distances).sum())  # distinct distances: one tree
    points[1] = points[0]  # a duplicate point (an anchor that is also a sampled voxel)
    distances = cdist(points, points)
    rows, cols = minimum_spanning_tree_edges(distances)
    assert {tuple(sorted(edge)) for edge in zip(rows.tolist(), cols.tolist())} >= {(0, 1)}
    assert distances[rows, cols].sum() == pytest.approx(minimum_spanning_tree(np.delete(np.delete(distances, 1, 0), 1, 1)).sum())
