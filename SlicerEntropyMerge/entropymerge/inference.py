"""Running one network over a whole volume: sliding windows, device choice, outputs on the input grid."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .entropy import normalized_entropy, predicted_labels
from .errors import UserInputError
from .modelcard import InferenceSettings
from .padding import pad_far_ends, pad_to_multiple
from .preprocessing import ModelSpaceImage, to_input_grid

ProgressCallback = Callable[[float], None]


def resolve_device(requested: str = "auto") -> torch.device:
    """The torch device for a ``--device`` choice.

    Args:
        requested: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``/``"gpu"`` or
            ``"cuda:N"`` (case-insensitive; empty means auto).

    Returns:
        The device.

    Raises:
        UserInputError: an unknown device, CUDA asked for without a CUDA GPU, or a GPU index that does not exist.
    """
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "gpu":
        requested = "cuda"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserInputError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"device {requested} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserInputError(f"unsupported device {requested!r}; use auto, cpu, cuda or cuda:N")
    return device


def describe_device(device: torch.device) -> str:
    """``"cpu"``, or ``"cuda:0 (<GPU name>)"`` for a CUDA device, for logs and summaries."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def window_count(spatial_shape, roi_size, overlap: float) -> int:
    """How many windows a sliding-window pass takes (for progress reporting), as MONAI tiles them.

    Args:
        spatial_shape: the (X, Y, Z) size of the (padded) input, voxels.
        roi_size: the window size, voxels per axis (capped at the input size).
        overlap: the fraction of a window shared with its neighbour, in [0, 1).

    Returns:
        The number of windows.
    """
    total = 1
    for size, roi in zip(spatial_shape, roi_size):
        roi = min(roi, size)
        interval = max(int(roi * (1 - overlap)), 1)
        total *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return total


def autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported); full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class InferenceReport:
    """Where a pass ran in the end, and the fallbacks it took (notes for the user, without repeats)."""

    device: str
    notes: list[str]

    def note(self, text: str) -> None:
        """Add ``text`` to the notes unless it is there already."""
        if text not in self.notes:
            self.notes.append(text)


# Bytes per voxel and per full-resolution feature channel that a whole-volume forward pass holds at its peak
# (a MONAI UNet on the CPU measured ~18; rounded up for other networks and allocator slack).
WHOLE_VOLUME_BYTES_PER_VOXEL_CHANNEL = 24


def available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes: CUDA's free memory, or the system's available memory (psutil);
    None when it cannot be told (psutil missing)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def whole_volume_bytes(network: torch.nn.Module, spatial_shape: Sequence[int]) -> int:
    """Estimated peak memory of one forward pass over the whole volume, in bytes.

    Args:
        network: the network (the width of its first convolution counts; 32 when it has none).
        spatial_shape: the (X, Y, Z) size of the input, voxels.

    Returns:
        voxels x width x ``WHOLE_VOLUME_BYTES_PER_VOXEL_CHANNEL``.
    """
    first = next((m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    width = int(first.out_channels) if first is not None else 32
    return int(np.prod(spatial_shape)) * width * WHOLE_VOLUME_BYTES_PER_VOXEL_CHANNEL


def is_out_of_memory(error: BaseException) -> bool:
    """True for a torch out-of-memory error, or the RuntimeError a CPU allocation failure raises."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in ("can't allocate memory", "not enough memory")))


def predict_logits(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    settings: InferenceSettings,
    device: torch.device,
    progress: ProgressCallback | None = None,
    report: InferenceReport | None = None,
) -> torch.Tensor:
    """Logits of ``network`` over a whole model-space input.

    The volume is padded (``settings.padding_mode``, edge values by default) only as far as the
    network needs: for a whole-volume pass (``inferer="whole"``) up to the next multiple of its
    ``spatial_multiple``; for sliding windows of ``settings.roi_size`` (fitted with
    ``fit_to_volume``) only along axes shorter than the window.
    A whole-volume pass that would not fit in memory runs in sliding windows instead; on a CUDA
    out-of-memory error it retries with one window at a time and CPU stitching, then on the CPU.
    Each fallback is noted in ``report``.

    Args:
        network: the segmentation network (moved to ``device``).
        inputs: (1, C_in, X, Y, Z) model input (image and feature channels).
        settings: how to run it (inferer, window size in voxels, overlap, batch, blend and padding modes).
        device: where to run it; mixed precision on CUDA.
        progress: called with the fraction of windows done, in [0, 1].
        report: receives the device finally used and the fallback notes.

    Returns:
        (1, C, X, Y, Z) float32 logits on the CPU.

    Raises:
        UserInputError: the network cannot take the window size (its strides need other sizes).
    """
    report = report if report is not None else InferenceReport(str(device), [])
    if settings.inferer != "whole":  # full windows need no padding; only an axis shorter than the window does
        extra = [max(roi - size, 0) for roi, size in zip(settings.roi_size, inputs.shape[2:])]
        padded, crop = pad_far_ends(inputs, extra, settings.padding_mode)
        return _windows_with_fallbacks(network, padded, settings, device, progress, report)[crop]
    padded, crop = pad_to_multiple(inputs, settings.spatial_multiple, settings.padding_mode)
    needed, free = whole_volume_bytes(network, padded.shape[2:]), available_memory(device)
    if free is None or needed <= free // 2:
        try:
            return _checked_forward(network, padded, device, progress)[crop].cpu()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.note(f"the whole volume {tuple(padded.shape[2:])} does not fit in {device.type} memory at once; "
                f"running sliding windows of {settings.roi_size} instead")
    return _windows_with_fallbacks(network, padded, settings, device, progress, report)[crop]


def _windows_with_fallbacks(network, inputs, settings, device, progress, report) -> torch.Tensor:
    attempts = [(device, settings.sw_batch_size, device)]
    if device.type == "cuda":
        attempts += [(device, 1, torch.device("cpu")), (torch.device("cpu"), settings.sw_batch_size, torch.device("cpu"))]
    for attempt, (window_device, batch, stitch_device) in enumerate(attempts):
        try:
            return _sliding_window(network, inputs, settings, window_device, batch, stitch_device, progress)
        except torch.OutOfMemoryError:
            if attempt == len(attempts) - 1:
                raise
            torch.cuda.empty_cache()
            next_device, next_batch, next_stitch = attempts[attempt + 1]
            report.note(f"GPU out of memory; retrying on {next_device} with {next_batch} window(s) per batch, "
                        f"stitching on {next_stitch}")
            report.device = str(next_device)
    raise AssertionError("unreachable")


def _checked_forward(network: torch.nn.Module, inputs: torch.Tensor, device: torch.device, progress=None) -> torch.Tensor:
    """One forward pass with mixed precision on CUDA; a size the network cannot take is a user error, not a traceback."""
    network = network.to(device)
    try:
        with torch.inference_mode(), autocast(device):
            logits = network(inputs.to(device)).float()
    except RuntimeError as error:
        if "Sizes of tensors must match" not in str(error):
            raise
        raise UserInputError(
            f"the network cannot take an input of {tuple(inputs.shape[2:])} voxels ({str(error).splitlines()[0]}); "
            "give a window size (--roi-size, --probe-size) that is a multiple of its total downsampling factor"
        ) from None
    if progress:
        progress(1.0)
    return logits


def _sliding_window(network, inputs, settings, device, batch, stitch_device, progress) -> torch.Tensor:
    network = network.to(device)
    total = math.ceil(window_count(inputs.shape[2:], settings.roi_size, settings.overlap) / batch)
    done = 0

    def predictor(window: torch.Tensor) -> torch.Tensor:
        nonlocal done
        logits = _checked_forward(network, window, device)
        done += 1
        if progress:
            progress(min(done / total, 1.0))
        return logits

    with torch.inference_mode():
        logits = sliding_window_inference(
            inputs,
            roi_size=settings.roi_size,
            sw_batch_size=batch,
            predictor=predictor,
            overlap=settings.overlap,
            mode=settings.blend_mode,
            padding_mode=settings.padding_mode,
            sw_device=device,
            device=stitch_device,
        )
    return torch.as_tensor(logits).cpu()


@dataclass
class Segmentation:
    """A model's result on the input volume's grid (voxels in the input file's (i, j, k) order)."""

    labels: np.ndarray  # (I, J, K) integer labels
    entropy: np.ndarray  # (I, J, K) float32 in [0, 1]
    probabilities: np.ndarray | None = None  # (C, I, J, K) float32, when asked for


def segmentation_from_probabilities(probabilities: torch.Tensor, image: ModelSpaceImage, keep_probabilities: bool = False) -> Segmentation:
    """Resample model-space class probabilities (C, X, Y, Z) linearly onto the input grid, then argmax and entropy.

    Resampling probabilities rather than labels keeps labels and entropy consistent and gives
    smooth boundaries when the model's grid is coarser than the input's.

    Args:
        probabilities: (C, X, Y, Z) softmax outputs on the model grid of ``image``.
        image: the model-space image, whose ``input_geometry`` is the destination grid.
        keep_probabilities: also keep the resampled (C, I, J, K) probabilities.

    Returns:
        The ``Segmentation``: uint8 labels (uint16 beyond 256 classes) and float32 normalised entropy,
        both (I, J, K).
    """
    probabilities = to_input_grid(probabilities.float(), image, mode="bilinear")
    labels = predicted_labels(probabilities, dim=0).numpy().astype(np.uint8 if probabilities.shape[0] <= 256 else np.uint16)
    entropy = normalized_entropy(probabilities, dim=0).numpy().astype(np.float32)
    return Segmentation(labels, entropy, probabilities.numpy() if keep_probabilities else None)
