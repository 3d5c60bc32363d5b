"""Input sizes a network can take: the factor its strides impose, window sizes fitted to it, and the padding
that brings a volume up to those sizes (and the crop that takes results back)."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .modelcard import InferenceSettings


def round_up(size: int, multiple: int) -> int:
    """``size`` rounded up to the next multiple of ``multiple`` (both positive integers)."""
    return -(-int(size) // int(multiple)) * int(multiple)


# Downsampling factor of MONAI networks whose factor is fixed by design (the others are computed from their strides).
FIXED_MULTIPLES = {"BasicUNet": 16, "BasicUnet": 16, "Basicunet": 16, "BasicUNetPlusPlus": 16, "SwinUNETR": 32,
                   "FlexibleUNet": 32, "UNETR": 16}


def network_multiple(spec: dict | None) -> tuple[int, int, int]:
    """Per-axis factor that every input size must be a multiple of, from a MONAI network definition.

    Args:
        spec: the network definition (``{"_target_": "UNet", "strides": [2, 2], ...}``); None for a
            TorchScript model.

    Returns:
        (fx, fy, fz) in voxels: the product of the strides for UNet-like networks, a fixed factor for
        networks in ``FIXED_MULTIPLES``, 2^(levels - 1) for SegResNet, 1 where the network is not known.
    """
    if not isinstance(spec, dict):
        return (1, 1, 1)
    name = str(spec.get("_target_", "")).rsplit(".", 1)[-1]
    if name in FIXED_MULTIPLES:
        return (FIXED_MULTIPLES[name],) * 3
    if name == "SegResNet":
        levels = len(spec.get("blocks_down") or (1, 2, 2, 4))
        return (2 ** (levels - 1),) * 3
    strides = spec.get("strides")
    if name in ("UNet", "Unet", "AttentionUnet", "DynUNet", "DynUnet") and isinstance(strides, (list, tuple)):
        factor = [1, 1, 1]
        for stride in strides:
            per_axis = stride if isinstance(stride, (list, tuple)) else (stride,) * 3
            factor = [f * int(s) for f, s in zip(factor, per_axis)]
        return tuple(factor)
    return (1, 1, 1)


def fit_window(size: Sequence[int], spatial_shape: Sequence[int], multiple: Sequence[int], what: str,
               notes: list[str]) -> tuple[int, int, int]:
    """A window size that the network can take and that is no larger than it needs to be for the volume.

    Args:
        size: the asked window size, voxels per axis.
        spatial_shape: the (X, Y, Z) size of the model-space volume.
        multiple: the network's per-axis factor (``network_multiple``).
        what: how the note names the window (e.g. ``"--roi-size"``).
        notes: a note is appended here when ``size`` had to be rounded up.

    Returns:
        ``size`` rounded up to ``multiple``, then shrunk to the volume's size rounded up to ``multiple``.
    """
    size = tuple(int(s) for s in size)
    rounded = tuple(round_up(s, m) for s, m in zip(size, multiple))
    if rounded != size:
        notes.append(f"{what} {size} rounded up to {rounded}: the network needs sizes that are multiples of {tuple(multiple)}")
    return tuple(min(r, round_up(s, m)) for r, s, m in zip(rounded, spatial_shape, multiple))


def fit_to_volume(settings: InferenceSettings, spatial_shape: Sequence[int], notes: list[str],
                  what: str = "the sliding-window ROI") -> InferenceSettings:
    """``settings`` with ``roi_size`` fitted to this volume and network by ``fit_window`` (using
    ``settings.spatial_multiple``); ``notes`` and ``what`` as there."""
    return replace(settings, roi_size=fit_window(settings.roi_size, spatial_shape, settings.spatial_multiple, what, notes))


def pad_to_multiple(volume: torch.Tensor, multiple, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims at their far ends up to a multiple.

    Args:
        volume: (N, C, X, Y, Z).
        multiple: one int for every axis, or one per axis (voxels).
        mode: a ``torch.nn.functional.pad`` mode; ``"replicate"`` repeats the edge values.

    Returns:
        (padded, crop): the (N, C, X', Y', Z') volume and the index that crops a result of that
        size back to (N, C, X, Y, Z).
    """
    sizes = volume.shape[2:]
    multiples = multiple if isinstance(multiple, (tuple, list)) else (multiple,) * len(sizes)
    return pad_far_ends(volume, [(-size) % m for size, m in zip(sizes, multiples)], mode)


def pad_far_ends(volume: torch.Tensor, extra, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad each spatial dim by ``extra`` voxels at its far end.

    Args:
        volume: (N, C, X, Y, Z).
        extra: voxels to add along X, Y, Z (non-negative).
        mode: a ``torch.nn.functional.pad`` mode.

    Returns:
        (padded, crop): the padded volume (``volume`` itself when nothing is added) and the index that
        crops a result back to the original spatial size.
    """
    sizes = volume.shape[2:]
    if not any(extra):
        return volume, (slice(None),) * volume.ndim
    padding = [amount for e in reversed(extra) for amount in (0, int(e))]
    padded = F.pad(volume, padding, mode=mode)
    return padded, (slice(None), slice(None), *(slice(0, size) for size in sizes))
