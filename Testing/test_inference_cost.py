"""Cheaper fixed costs give the same numbers: the percentile intensity step taken with numpy."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles

from entropymerge.preprocessing import intensity_transform


@pytest.mark.parametrize("step", [
    {"lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"lower": 2, "upper": 98, "b_min": -1.0, "b_max": 1.0, "clip": False},
    {"lower": 1, "upper": 99, "b_min": 0.0, "b_max": 1.0, "clip": True, "relative": True},  # MONAI's own path
])
def test_percentile_scaling_matches_monai(step):
    image = MetaTensor(torch.as_tensor(np.random.default_rng(0).gamma(2.0, 100.0, (1, 30, 20, 10)).astype(np.float32)),
                       affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    expected = ScaleIntensityRangePercentiles(**step)(image)
    result = intensity_transform({"_target_": "ScaleIntensityRangePercentiles", **step}, "test")(image)
    np.testing.assert_allclose(np.asarray(result), np.asarray(expected), atol=1e-6)
    assert torch.equal(result.affine, image.affine)
