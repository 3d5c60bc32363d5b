"""Shared fixtures: the real data beside the project, and small site models made on the fly."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from entropymerge.modelcard import FeatureSpec, InferenceSettings, ModelCard, Preprocessing, default_labels
from entropymerge.models import save_site_model
from entropymerge.safeconfig import build_network
from entropymerge.volume import Geometry, write_volume

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENTROPYMERGE_SHARED_DATA", REPOSITORY.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file of ../shared/data; the test is skipped (with the reason) when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data not available: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(autouse=True)
def locale_unchanged():
    """No test may change the process's locale: later tests would read and write text in another encoding."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    assert locale.setlocale(locale.LC_ALL) == before, "this test changed the process's locale"


def tiny_unet_spec(in_channels: int = 1, classes: int = 3) -> dict:
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": classes,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 1,
        "norm": ["instance", {"affine": True}],
    }


def make_card(name: str = "site", classes: int = 3, orientation: str | None = "RAS", spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32),
              **changes) -> ModelCard:
    card = ModelCard(
        name=name,
        site=f"{name} hospital",
        labels=default_labels(["background"] + [f"structure {i}" for i in range(1, classes)]),
        input_channels=1,
        preprocessing=Preprocessing(
            orientation=orientation,
            spacing=tuple(spacing) if spacing else None,
            intensity=({"_target_": "ScaleIntensityRangePercentiles", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},),
        ),
        inference=InferenceSettings(tuple(roi), 0.25, 2),
        network=tiny_unet_spec(1, classes),
    )
    for key, value in changes.items():
        setattr(card, key, value)
    return card


# Card changes for a tiny model of the simulated sites' four labels: 4 mm model space, so cases run
# fast, and first-layer channels unlike the class count, so the head is found.
SAMPLE_LABELS_MODEL = {"classes": 4, "spacing": (4.0, 4.0, 4.0), "network": {**tiny_unet_spec(1, 4), "channels": [6, 12, 24]}}


def write_tiny_model(folder: Path, name: str = "site", seed: int = 0, **card_changes) -> Path:
    """A small randomly initialised UNet site model (safetensors + card) in ``folder``; returns the card path."""
    card = make_card(name, **card_changes)
    torch.manual_seed(seed)
    network = build_network(card.network, "test")
    return save_site_model(network, card, folder, name)


@pytest.fixture
def model_factory(tmp_path):
    """Writes a small randomly initialised UNet site model (safetensors + card); returns the card path."""

    def make(name: str = "site", seed: int = 0, folder: Path | None = None, **card_changes) -> Path:
        return write_tiny_model(folder or tmp_path / "models", name, seed, **card_changes)

    return make


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``entropymerge`` command in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "entropymerge", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a command that exited 2 (asserted: exit status 2, one line on stderr)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


IDENTITY = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


@pytest.fixture
def volume(tmp_path):
    """``small.nii.gz``: 20^3 voxels of 2 mm, identity direction, seeded Gaussian noise (float32); returns its path."""
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    return write_volume(np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32), geometry, tmp_path / "small.nii.gz")


@pytest.fixture(scope="module")
def mind_models(tmp_path_factory):
    """Three MIND-feature site models fine-tuned (here: perturbed) from one shared initialisation."""
    folder = tmp_path_factory.mktemp("mind-models")
    card = replace(make_card("base"), input_channels=13, features=FeatureSpec("mind-ssc", "1", 12), network=tiny_unet_spec(13, 3))
    torch.manual_seed(0)
    base = build_network(card.network, "test")
    for k in range(3):
        network = build_network(card.network, "test")
        network.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.05 * (k + 1) * torch.randn(parameter.shape, generator=generator))
        save_site_model(network, replace(card, name=f"site{k}"), folder, f"site{k}")
    return folder


@pytest.fixture(scope="module")
def sphere_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    geometry = Geometry((40, 36, 28), (2.0, 2.0, 2.5), (10.0, -4.0, 3.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.shape], indexing="ij"))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[((grid[0] - 20) ** 2 + (grid[1] - 18) ** 2 + (grid[2] - 14) ** 2) < 64] = 1
    labels[((grid[0] - 12) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - 14) ** 2) < 16] = 2
    image = 100.0 * labels + np.random.default_rng(0).normal(0, 10, geometry.shape)
    return (write_volume(image.astype(np.float32), geometry, folder / "image.nii.gz"),
            write_volume(labels, geometry, folder / "labels.nii.gz"))
