"""The synthetic multi-site generator and the training recipe (re-trained here in a tiny version)."""


import numpy as np
import pytest
import torch

from entropymerge.cli import main
from entropymerge.compatibility import check_compatible
from entropymerge.models import load_site_models
from entropymerge.safeconfig import build_network
from entropymerge.sampledata import LABEL_NAMES, SOURCE_SITES, TARGET_SITES, TISSUES, simulate, write_case
from entropymerge.training import TrainingConfig, case_seed, model_card, prepare_cases, train_stage
from entropymerge.volume import read_volume


def test_generation_is_seeded():
    scanner = SOURCE_SITES["summit-pd"]
    a_image, a_labels = simulate(scanner, 3)
    b_image, b_labels = simulate(scanner, 3)
    np.testing.assert_array_equal(a_image.array, b_image.array)
    np.testing.assert_array_equal(a_labels.array, b_labels.array)
    c_image, _ = simulate(scanner, 4)
    assert c_image.array.shape != a_image.array.shape or not np.array_equal(c_image.array, a_image.array)


@pytest.mark.parametrize("name", [*SOURCE_SITES, *TARGET_SITES])
def test_each_scanner_writes_its_geometry_and_all_structures(tmp_path, name):
    scanner = {**SOURCE_SITES, **TARGET_SITES}[name]
    image_path, labels_path = write_case(scanner, 5, tmp_path)
    image, labels = read_volume(image_path), read_volume(labels_path)
    assert image.geometry.orientation == scanner.orientation
    np.testing.assert_allclose(image.geometry.spacing, scanner.spacing)
    assert labels.geometry.matches(image.geometry)
    counts = np.bincount(labels.array.ravel(), minlength=len(LABEL_NAMES))
    voxel = np.prod(scanner.spacing)
    assert counts[1] * voxel > 20_000, "the organ is a large structure"
    assert 0 < counts[3] * voxel < counts[1] * voxel / 5, "the lesion is small"
    assert counts[2] > 0, "the vessel is present"


def test_lesion_lies_inside_the_organ_and_the_vessel_is_thin():
    image, labels = simulate(SOURCE_SITES["summit-pd"], 21)
    from scipy import ndimage

    lesion = labels.array == 3
    around = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
    neighbours = labels.array[around]
    assert (neighbours == 1).mean() > 0.5, "a lesion is mostly surrounded by organ"
    vessel = labels.array == 2
    distance = ndimage.distance_transform_edt(vessel, sampling=labels.geometry.spacing)
    assert distance.max() < 6.0, "the vessel is a thin tube (radius under 6 mm)"


def test_unseen_sites_have_parameters_no_source_site_has():
    for target in TARGET_SITES.values():
        for source in SOURCE_SITES.values():
            contrast_t = np.array([target.contrast[t] for t in TISSUES])
            contrast_s = np.array([source.contrast[t] for t in TISSUES])
            assert not np.allclose(contrast_t, contrast_s)
            assert target.spacing != source.spacing
            assert target.orientation != source.orientation or target.noise != source.noise


def test_sites_disagree_in_contrast_ordering():
    """Heterogeneous shift: the organ is brighter than the lesion at one site and darker at another."""
    orders = {name: np.sign(s.contrast["organ"] - s.contrast["lesion"]) for name, s in SOURCE_SITES.items()}
    assert len(set(orders.values())) == 2


def test_case_seeds_never_overlap_between_training_and_test():
    train = {case_seed(site, i) for site in [*SOURCE_SITES, "generic"] for i in range(100)}
    validation = {case_seed(site, i, "validation") for site in SOURCE_SITES for i in range(100)}
    test = {case_seed(site, i, "test") for site in TARGET_SITES for i in range(100)}
    assert not (train & test) and not (validation & test) and not (train & validation)
    assert min(test) >= 900_000 > max(train | validation)


def tiny_config(**changes) -> TrainingConfig:
    values = dict(base_cases=1, site_cases=1, validation_cases=1, base_steps=3, site_steps=2, patch_size=32,
                  sites=("riverside-t1", "valley-t2"), checkpoint_every=1, channels=(4, 8, 16, 32))
    values.update(changes)
    return TrainingConfig(**values)


def test_tiny_training_run_produces_loadable_compatible_site_models(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "models"), "--base-cases", "1", "--site-cases", "1", "--base-steps", "3",
                 "--site-steps", "2", "--patch-size", "32", "--sites", "riverside-t1", "valley-t2", "--progress", "none"])
    assert code == 0
    assert "riverside-t1:" in capsys.readouterr().out
    models = load_site_models([tmp_path / "models"])
    assert [m.name for m in models] == ["riverside-t1", "valley-t2"]
    check_compatible(models)
    card = models[0].card
    assert card.features.extractor == "mind-ssc" and card.input_channels == 13
    assert card.training["config"]["channel_dropout"] == 0.75
    assert set(card.training["train_seeds"]).isdisjoint(card.training["validation_seeds"])
    assert 0.0 <= card.training["validation_mean_dice_own_site"] <= 1.0
    # the intensity fingerprint of each site's training data: rising quantiles of [0, 1] intensities,
    # different for a T1 and a T2 site (their tissues are ordered differently)
    fingerprints = [m.card.training["intensity_fingerprint"] for m in models]
    for fingerprint in fingerprints:
        assert len(fingerprint) == 19 and fingerprint == sorted(fingerprint) and 0.0 <= fingerprint[0] < fingerprint[-1] <= 1.0
    assert fingerprints[0] != fingerprints[1]
    base = torch.load(tmp_path / "models" / "work" / "checkpoints" / "base.pt", weights_only=True)
    assert base["step"] == 3


def test_image_only_models(tmp_path):
    card = model_card(tiny_config(features="none"), "x", "site")
    assert card.features is None and card.input_channels == 1 and card.network["in_channels"] == 1


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    config = tiny_config()
    card = model_card(config, "x", "riverside-t1")
    cases = prepare_cases(SOURCE_SITES["riverside-t1"], [case_seed("riverside-t1", 0)], card)

    def fresh():
        torch.manual_seed(0)
        return build_network(card.network, "test")

    whole = fresh()
    train_stage(whole, cases, 4, 1e-3, config, "stage", tmp_path / "whole.pt")

    class Interrupt(Exception):
        pass

    def stop_after_two(step, total, loss):
        if step == 2:
            raise Interrupt()

    interrupted = fresh()
    with pytest.raises(Interrupt):
        train_stage(interrupted, cases, 4, 1e-3, config, "stage", tmp_path / "resumed.pt", stop_after_two)
    resumed = fresh()
    result = train_stage(resumed, cases, 4, 1e-3, config, "stage", tmp_path / "resumed.pt")
    assert result.resumed_from == 1
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_bad_training_options(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--sites", "mars-mri", "--progress", "none"]) == 2
    assert "unknown source site(s) mars-mri" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--channel-dropout", "1.5", "--progress", "none"]) == 2
    assert "--channel-dropout must be in [0, 1)" in capsys.readouterr().err
