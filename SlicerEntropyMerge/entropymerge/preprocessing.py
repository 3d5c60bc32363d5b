"""Moving a volume into a model's space (orientation, spacing, intensity) and results back.

Both directions use MONAI transforms on ``MetaTensor`` s that carry their voxel-to-RAS affine, so
the inverse is a resampling from the model grid onto the exact input grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, Spacing, SpatialResample

from .errors import UserInputError
from .modelcard import Preprocessing
from .safeconfig import array_transform_name, build_intensity_transform
from .volume import Geometry, Volume


@dataclass
class ModelSpaceImage:
    """A volume resampled and normalised for a model.

    Attributes:
        tensor: (1, X, Y, Z) float32 ``MetaTensor`` whose ``affine`` is the model grid's voxel-to-RAS
            matrix (mm).
        input_geometry: the grid of the volume it came from, where results are written back.
    """

    tensor: MetaTensor
    input_geometry: Geometry

    @property
    def geometry(self) -> Geometry:
        """The model-space grid (shape X, Y, Z; spacing, origin and direction in LPS mm)."""
        return Geometry.from_affine_ras(self.tensor.affine.numpy(), self.tensor.shape[1:])

    @property
    def on_input_grid(self) -> bool:
        """True when preprocessing kept the input grid (every voxel within 1e-4 mm), so no resampling back is needed."""
        return self.geometry.matches(self.input_geometry, tolerance_mm=1e-4)


def to_model_space(volume: Volume, preprocessing: Preprocessing) -> ModelSpaceImage:
    """Reorient, resample and normalise ``volume`` as the model card's preprocessing says.

    Args:
        volume: the input volume, (I, J, K) voxels of any numeric type on its own grid.
        preprocessing: the card's target orientation (axis codes such as ``"RAS"``), spacing (mm;
            resampled bilinearly with border padding, skipped when already within 1e-6 mm) and
            intensity steps (MONAI transforms, applied in order).

    Returns:
        The ``ModelSpaceImage``: (1, X, Y, Z) float32 on the model grid.

    Raises:
        UserInputError: an intensity step cannot be built or applied (names the step).
    """
    image = MetaTensor(
        torch.from_numpy(volume.array.astype(np.float32, copy=False))[None],
        affine=torch.as_tensor(volume.geometry.affine_ras, dtype=torch.float64),
    )
    if preprocessing.orientation:
        image = Orientation(axcodes=preprocessing.orientation)(image)
    if preprocessing.spacing and not np.allclose(_spacing_after(image), preprocessing.spacing, rtol=0, atol=1e-6):
        image = Spacing(pixdim=preprocessing.spacing, mode="bilinear", padding_mode="border")(image)
    for index, step in enumerate(preprocessing.intensity):
        where = f"preprocessing.intensity[{index}]"
        transform = intensity_transform(step, where)
        try:
            image = transform(image)
        except Exception as error:  # arguments of the wrong type only fail when applied
            raise UserInputError(f"{where} ({step['_target_']}) cannot be applied: {str(error).strip() or type(error).__name__}") from None
    image = MetaTensor(torch.as_tensor(image, dtype=torch.float32).contiguous(), affine=image.affine)
    return ModelSpaceImage(image, volume.geometry)


def intensity_transform(step: dict, where: str):
    """The MONAI intensity transform for one preprocessing step.

    ``ScaleIntensityRangePercentiles`` (plain form) becomes ``ScaleIntensityRange`` between percentiles
    taken with numpy: the same values, without the full sort of ``torch.quantile`` that made it most
    of the preprocessing time.

    Args:
        step: ``{"_target_": name, **arguments}`` of an allow-listed MONAI intensity transform.
        where: where the step is written (e.g. ``"preprocessing.intensity[0]"``), for error messages.

    Returns:
        A callable from a (1, X, Y, Z) tensor to the normalised tensor of the same shape.

    Raises:
        UserInputError: the transform is not allow-listed or its arguments are wrong.
    """
    plain = {"_target_", "lower", "upper", "b_min", "b_max", "clip"}
    if array_transform_name(str(step.get("_target_", ""))) != "ScaleIntensityRangePercentiles" or not set(step) <= plain:
        return build_intensity_transform(step, where)
    build_intensity_transform(step, where)  # the same checks of the arguments

    def scale(image: torch.Tensor) -> torch.Tensor:
        low, high = np.percentile(np.asarray(image, dtype=np.float32), [step["lower"], step["upper"]])
        return ScaleIntensityRange(float(low), float(high), step.get("b_min"), step.get("b_max"), bool(step.get("clip", False)))(image)

    return scale


def _spacing_after(image: MetaTensor) -> np.ndarray:
    return np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)


def to_input_grid(data: torch.Tensor, image: ModelSpaceImage, mode: str = "bilinear") -> torch.Tensor:
    """Resample model-space ``data`` onto the input volume's grid (border padding outside the model grid).

    Args:
        data: (C, X, Y, Z) values on the model grid of ``image``.
        image: the model-space image whose ``input_geometry`` is the destination.
        mode: ``"bilinear"`` for probabilities and entropy, ``"nearest"`` for labels.

    Returns:
        (C, I, J, K) float32 on the input grid; ``data`` itself when the grids are the same.
    """
    if image.on_input_grid:
        return data
    resampled = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
        MetaTensor(data, affine=image.tensor.affine),
        dst_affine=torch.as_tensor(image.input_geometry.affine_ras, dtype=torch.float64),
        spatial_size=image.input_geometry.shape,
    )
    return torch.as_tensor(resampled)


def labels_to_model_space(labels: Volume, image: ModelSpaceImage, outside: int = -1) -> torch.Tensor:
    """A label map on the input grid, resampled (nearest neighbour) onto the model-space grid of ``image``.

    Args:
        labels: (I, J, K) integer label map on the input grid.
        image: the model-space image whose grid is the destination.
        outside: the value of model-space voxels beyond the input volume (-1: unknown).

    Returns:
        (X, Y, Z) int64 labels on the model grid.
    """
    values = torch.from_numpy(labels.array.astype(np.float32))
    if image.on_input_grid:
        return values.round().long()
    # Shifted so that the resampler's zero padding lands on ``outside`` when shifted back.
    shifted = MetaTensor(values[None] - outside, affine=torch.as_tensor(labels.geometry.affine_ras, dtype=torch.float64))
    resampled = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        shifted, dst_affine=image.tensor.affine, spatial_size=tuple(image.tensor.shape[1:]))
    return torch.as_tensor(resampled)[0].round().long() + outside
