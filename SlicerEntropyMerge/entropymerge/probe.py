"""The probe: a bounded part of the target volume that every site model sees.

The K site models never run on the whole volume; they run on a few patches chosen over the body
(``select_probe``), in batches of ``probe_batch_size`` patches. The statistics of their outputs
there drive the merge coefficients, and the ranking reads features on the same patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import UserInputError
from .inference import autocast
from .padding import fit_window, pad_far_ends, pad_to_multiple


@dataclass
class Probe:
    """Patches of the model-space input that the site models run on: (P, C_in, X, Y, Z).

    Attributes:
        patches: (P, C_in, X, Y, Z) model input patches.
        origins: P (x, y, z) voxel origins of the patches in the model input.
        mode: "patches" or "whole" (the volume at half resolution).
        notes: what was adjusted while choosing it, for the user.
    """

    patches: torch.Tensor
    origins: list[tuple[int, int, int]]
    mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def voxels(self) -> int:
        """Voxels the site models see on the probe: P x X x Y x Z."""
        return int(self.patches.shape[0] * np.prod(self.patches.shape[2:]))

    def describe(self) -> dict:
        """The probe for summary.json: mode, patch count and size, voxels, origins."""
        return {
            "mode": self.mode,
            "patches": int(self.patches.shape[0]),
            "patch_size": list(self.patches.shape[2:]),
            "voxels": self.voxels,
            "origins": [list(o) for o in self.origins],
        }


def default_probe_size(roi_size, multiple=(1, 1, 1)) -> tuple[int, int, int]:
    """Half the ROI per axis, kept a multiple of 16 and of the network's size multiple (and at least that):
    about one window per model for 8 patches.

    Args:
        roi_size: the sliding-window ROI (X, Y, Z) in voxels.
        multiple: the network's spatial size multiple per axis.

    Returns:
        The probe patch size (X, Y, Z) in voxels.
    """
    steps = [math.lcm(16, int(m)) for m in multiple]
    return tuple(max(step, (r // 2) // step * step) for r, step in zip(roi_size, steps))


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """Voxels that differ clearly from the background value (the median of the volume's faces).

    Works for dark (MR, CT air) and bright backgrounds alike.

    Args:
        image: (X, Y, Z) intensities.

    Returns:
        (X, Y, Z) bool mask of the body.
    """
    faces = torch.cat([image[0].flatten(), image[-1].flatten(), image[:, 0].flatten(), image[:, -1].flatten(),
                       image[:, :, 0].flatten(), image[:, :, -1].flatten()])
    background = float(faces.median())
    sample = image.flatten()[:: max(1, image.numel() // 250_000)].float().numpy()  # percentiles from a sample
    low, high = np.percentile(sample, [1, 99])
    return (image - background).abs() > 0.1 * max(high - low, 1e-6)


def select_probe(inputs: torch.Tensor, patch_size, max_patches: int = 4, mode: str = "patches",
                 multiple=(16, 16, 16)) -> Probe:
    """Choose the probe from the model input, deterministically.

    ``patches``: up to ``max_patches`` patches that cover the body (most body voxels first, then as
    far apart as possible); the patch size is rounded up to the network's size ``multiple`` (with a
    note) and shrunk to the volume rounded up to it, so the volume is padded (edge values) by less
    than one multiple at most. ``whole``: the whole volume at half resolution, padded to the multiple.

    Args:
        inputs: (1, C_in, X, Y, Z) model input.
        patch_size: wanted patch size (X, Y, Z) in voxels (``patches`` mode).
        max_patches: the most patches to take.
        mode: "patches" or "whole".
        multiple: the network's spatial size multiple per axis.

    Returns:
        The probe: (P, C_in, x, y, z) patches with their origins and notes.
    """
    notes: list[str] = []
    if mode == "whole":
        half = torch.nn.functional.interpolate(inputs.float(), scale_factor=0.5, mode="trilinear", align_corners=False)
        padded, _ = pad_to_multiple(half, tuple(multiple))
        return Probe(padded, [(0, 0, 0)], "whole", notes)
    if mode != "patches":
        raise UserInputError(f"unknown probe mode {mode!r}; use patches or whole")
    if max_patches < 1:
        raise UserInputError(f"--probe-patches must be at least 1, got {max_patches}")
    spatial = inputs.shape[2:]
    size = list(fit_window(patch_size, spatial, multiple, "the probe patch size", notes))
    inputs, _ = pad_far_ends(inputs, [max(p - s, 0) for p, s in zip(size, spatial)])  # a volume smaller than a patch
    spatial = inputs.shape[2:]
    mask = body_mask(inputs[0, 0]).double()
    integral = torch.nn.functional.pad(mask.cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    stride = [max(p // 2, 1) for p in size]
    starts = [sorted(set(range(0, s - p + 1, st)) | {s - p}) for s, p, st in zip(spatial, size, stride)]
    candidates = [
        (_box_mean(integral, origin, size), origin)
        for origin in ((x, y, z) for x in starts[0] for y in starts[1] for z in starts[2])
    ]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    wanted = min(max_patches, len(candidates))
    if wanted < max_patches:
        notes.append(f"the volume holds only {len(candidates)} distinct probe patches; using {wanted} instead of {max_patches}")
    # Most body first, then as far from the chosen ones as possible among well-covered patches.
    eligible = [c for c in candidates if c[0] >= 0.5 * candidates[0][0]]
    pool = eligible if len(eligible) >= wanted else candidates
    chosen = [pool[0]]
    while len(chosen) < wanted:
        remaining = [c for c in pool if c not in chosen]
        chosen.append(max(remaining, key=lambda c: (min(np.linalg.norm(np.subtract(c[1], o[1])) for o in chosen), c[0])))
    origins = [c[1] for c in chosen]
    return Probe(crop_patches(inputs, origins, size), origins, "patches", notes)


def crop_patches(inputs: torch.Tensor, origins, size) -> torch.Tensor:
    """Patches cut from the model input, replicate-padded past the far edges.

    Args:
        inputs: (1, C, X, Y, Z) model input.
        origins: P (x, y, z) voxel origins.
        size: patch size (x, y, z) in voxels.

    Returns:
        (P, C, x, y, z) patches, in the order of ``origins``.
    """
    spatial = inputs.shape[2:]
    inputs, _ = pad_far_ends(inputs, [max(0, max(o[axis] for o in origins) + size[axis] - spatial[axis]) for axis in range(3)])
    return torch.cat([inputs[:, :, x : x + size[0], y : y + size[1], z : z + size[2]] for x, y, z in origins])


def _box_mean(integral: torch.Tensor, origin, size) -> float:
    """Mean of the mask over a box, from its zero-padded 3D cumulative sum."""
    (x0, y0, z0), (x1, y1, z1) = origin, [o + s for o, s in zip(origin, size)]
    total = (
        integral[x1, y1, z1] - integral[x0, y1, z1] - integral[x1, y0, z1] - integral[x1, y1, z0]
        + integral[x0, y0, z1] + integral[x0, y1, z0] + integral[x1, y0, z0] - integral[x0, y0, z0]
    )
    return float(total) / float(np.prod(size))


def probe_batch_size(probe: Probe, roi_size, windows: int = 4) -> int:
    """Probe patches per forward pass: as many as fit in ``windows`` ROI windows' worth of voxels.

    Args:
        probe: the probe.
        roi_size: the sliding-window ROI (X, Y, Z) in voxels.
        windows: how many ROI windows' worth of voxels one batch may hold.

    Returns:
        The batch size, between 1 and the number of patches.
    """
    patch_voxels = int(np.prod(probe.patches.shape[2:]))
    return max(1, min(probe.patches.shape[0], windows * int(np.prod(roi_size)) // patch_voxels))


def probe_probabilities(network: torch.nn.Module, probe: Probe, device: torch.device, batch_size: int = 2) -> torch.Tensor:
    """Softmax output of ``network`` on every probe patch.

    Args:
        network: the network (moved to ``device`` and put in eval mode).
        probe: the probe.
        device: where the network runs.
        batch_size: patches per forward pass.

    Returns:
        (P, C, X, Y, Z) float32 probabilities on the CPU.
    """
    return torch.cat(batched_forward(network, probe.patches, device, batch_size))


def patch_batches(patches: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of patches, in their order (the last one may be smaller).

    Args:
        patches: (P, C, X, Y, Z) patches.
        batch_size: the most patches per batch.

    Returns:
        Views of ``patches``, each (B, C, X, Y, Z) with B <= ``batch_size``, where ``patches`` are.
    """
    return [patches[start : start + batch_size] for start in range(0, patches.shape[0], batch_size)]


def softmax_on_cpu(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of logits, as every probe pass keeps them.

    Args:
        logits: (B, C, X, Y, Z) network output, on any device, in any float dtype.

    Returns:
        (B, C, X, Y, Z) float32 softmax over C, on the CPU.
    """
    return torch.softmax(logits.float(), dim=1).cpu()


def batched_forward(network: torch.nn.Module, patches: torch.Tensor, device: torch.device, batch_size: int,
                    collect: Callable[[torch.Tensor], Any] = softmax_on_cpu) -> list:
    """The one forward pass over patches, batch by batch, in inference mode with autocast on ``device``.

    Forward hooks on ``network`` see the batches in order, and ``collect`` runs inside the same
    inference and autocast context, right after each batch's forward pass.

    Args:
        network: the network (moved to ``device`` and put in eval mode).
        patches: (P, C_in, X, Y, Z) input patches, on any device.
        device: where the network runs.
        batch_size: patches per forward pass (``patch_batches``).
        collect: what to keep of each batch's (B, C, X, Y, Z) logits; default: the probabilities on the CPU.

    Returns:
        ``collect``'s result per batch, in the order of the patches.
    """
    network = network.to(device).eval()
    with torch.inference_mode(), autocast(device):
        return [collect(network(batch.to(device))) for batch in patch_batches(patches, batch_size)]


def apply_batchnorm_policy(network: torch.nn.Module, probe: Probe, policy: str, device: torch.device, batch_size: int = 2) -> None:
    """Set the merged network's batch-norm running statistics, in place.

    Args:
        network: the merged network; left in eval mode when it has batch norms to re-estimate.
        probe: the probe.
        policy: "merge": keep the merged running statistics; "reestimate": recompute them on the probe
            (a cumulative average over its batches).
        device: where the network runs.
        batch_size: patches per forward pass.

    Returns:
        None; ``network`` is changed in place.
    """
    if policy == "merge":
        return
    if policy != "reestimate":
        raise UserInputError(f"unknown batch-norm policy {policy!r}; use merge or reestimate")
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    network.to(device)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the probe batches
        norm.train()
    with torch.no_grad():  # training-mode batch norms and no autocast: not ``batched_forward``
        for batch in patch_batches(probe.patches, batch_size):
            network(batch.to(device))
    network.eval()
