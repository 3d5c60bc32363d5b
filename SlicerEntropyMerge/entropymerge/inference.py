"""Running one network over a whole volume: sliding windows, device choice, outputs on the input grid."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .entropy import normalized_entropy, predicted_labels
from .errors import UserInputError
from .modelcard import InferenceSettings
from .preprocessing import ModelSpaceImage, to_input_grid

ProgressCallback = Callable[[float], None]


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cpu``, ``cuda``/``gpu`` or ``cuda:N`` are forced."""
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
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def window_count(spatial_shape, roi_size, overlap: float) -> int:
    """How many windows a sliding-window pass takes (for progress reporting)."""
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
    device: str
    notes: list[str]


def predict_logits(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    settings: InferenceSettings,
    device: torch.device,
    progress: ProgressCallback | None = None,
    report: InferenceReport | None = None,
) -> torch.Tensor:
    """Sliding-window logits of ``network`` over ``inputs`` (1, C_in, X, Y, Z); returns (1, C, X, Y, Z) on CPU.

    On a CUDA out-of-memory error it retries with one window at a time and CPU stitching, then on
    the CPU, and notes each fallback in ``report``.
    """
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
            note = (
                f"GPU out of memory; retrying on {next_device} with {next_batch} window(s) per batch, "
                f"stitching on {next_stitch}"
            )
            if report is not None:
                report.notes.append(note)
                report.device = str(next_device)
    raise AssertionError("unreachable")


def _sliding_window(network, inputs, settings, device, batch, stitch_device, progress) -> torch.Tensor:
    network = network.to(device)
    total = math.ceil(window_count(inputs.shape[2:], settings.roi_size, settings.overlap) / batch)
    done = 0

    def predictor(window: torch.Tensor) -> torch.Tensor:
        nonlocal done
        with autocast(device):
            logits = network(window.to(device))
        done += 1
        if progress:
            progress(min(done / total, 1.0))
        return logits.float()

    with torch.inference_mode():
        logits = sliding_window_inference(
            inputs,
            roi_size=settings.roi_size,
            sw_batch_size=batch,
            predictor=predictor,
            overlap=settings.overlap,
            mode="gaussian",
            padding_mode="constant",
            sw_device=device,
            device=stitch_device,
        )
    return torch.as_tensor(logits).cpu()


@dataclass
class Segmentation:
    """A model's result on the input volume's grid."""

    labels: np.ndarray  # (I, J, K) integer labels
    entropy: np.ndarray  # (I, J, K) float32 in [0, 1]
    probabilities: np.ndarray | None = None  # (C, I, J, K) float32, when asked for


def segmentation_from_probabilities(probabilities: torch.Tensor, image: ModelSpaceImage, keep_probabilities: bool = False) -> Segmentation:
    """Resample model-space class probabilities (C, X, Y, Z) linearly onto the input grid, then argmax and entropy.

    Resampling probabilities rather than labels keeps labels and entropy consistent and gives
    smooth boundaries when the model's grid is coarser than the input's.
    """
    probabilities = to_input_grid(probabilities.float(), image, mode="bilinear")
    labels = predicted_labels(probabilities, dim=0).numpy().astype(np.uint8 if probabilities.shape[0] <= 256 else np.uint16)
    entropy = normalized_entropy(probabilities, dim=0).numpy().astype(np.float32)
    return Segmentation(labels, entropy, probabilities.numpy() if keep_probabilities else None)
