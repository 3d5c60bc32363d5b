"""DropGen stable-feature channels: domain-stable representations computed from the image.

A model trained with DropGen takes ``cat([image, F(image)])``: the normalised image plus the
channels of a frozen extractor F, each normalised per volume (z-score, as an instance norm without
affine). Extractors live in a registry by name:

- ``mind-ssc``: the MIND self-similarity-context descriptor (Heinrich et al., MICCAI 2013), 12
  channels, no weights. Squared patch differences make it blind to intensity offset, scale and
  inversion, so it stays put when a scanner's contrast changes.
- ``anatomix``: the published frozen 3D U-Net (1 -> 16 channels), built to match its state-dict
  layout exactly; it runs only with its real weights, never with random ones.

Features are cached on disk, keyed by the model-space image content and the extractor version.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError
from .modelcard import FeatureSpec

ANATOMIX_WEIGHTS_NAME = "anatomix.pth"


def default_cache_dir() -> Path:
    base = os.environ.get("ENTROPYMERGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "entropymerge")
    return Path(base)


def instance_normalize(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Z-score each channel of (N, C, X, Y, Z) over its volume (instance norm without affine)."""
    dims = tuple(range(2, features.ndim))
    mean = features.mean(dim=dims, keepdim=True)
    std = features.std(dim=dims, keepdim=True, unbiased=False)
    return (features - mean) / (std + eps)


def pad_to_multiple(volume: torch.Tensor, multiple, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of (N, C, X, Y, Z) at their far ends to a multiple (one int, or one per axis) with
    edge values (or another ``torch.nn.functional.pad`` mode); returns the padded volume and the crop back."""
    sizes = volume.shape[2:]
    multiples = multiple if isinstance(multiple, (tuple, list)) else (multiple,) * len(sizes)
    return pad_far_ends(volume, [(-size) % m for size, m in zip(sizes, multiples)], mode)


def pad_far_ends(volume: torch.Tensor, extra, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad each spatial dim of (N, C, X, Y, Z) by ``extra`` voxels at its far end; returns the padded volume and the
    crop back."""
    sizes = volume.shape[2:]
    if not any(extra):
        return volume, (slice(None),) * volume.ndim
    padding = [amount for e in reversed(extra) for amount in (0, int(e))]
    padded = F.pad(volume, padding, mode=mode)
    return padded, (slice(None), slice(None), *(slice(0, size) for size in sizes))


class FeatureExtractor:
    """A frozen map from a normalised image (1, 1, X, Y, Z) to raw feature channels (1, C, X, Y, Z)."""

    name: str = ""
    version: str = ""
    channels: int = 0
    spatial_multiple: int = 1

    def raw_features(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised features of ``image`` (1, 1, X, Y, Z), same spatial size."""
        padded, crop = pad_to_multiple(image.float(), self.spatial_multiple)
        with torch.inference_mode():
            features = self.raw_features(padded)[crop]
        return instance_normalize(features)

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.name, self.version, self.channels)


class MindSSC(FeatureExtractor):
    """MIND self-similarity context: 12 channels from patch distances between pairs of the six-neighbourhood.

    For each of the 12 pairs of six-neighbourhood offsets that lie sqrt(2) * dilation apart,
    D = box-filtered squared difference of the image shifted by the two offsets; then
    MIND = exp(-(D - min_pairs D) / V) with V the mean over pairs (clamped), as in Heinrich et al.
    """

    name = "mind-ssc"
    version = "1"
    channels = 12

    def __init__(self, radius: int = 1, dilation: int = 2):
        self.radius = radius
        self.dilation = dilation
        axes = [np.eye(3, dtype=int)[i] for i in range(3)]
        six = [sign * axis * dilation for axis in axes for sign in (1, -1)]
        self.pairs = [
            (six[a], six[b])
            for a in range(6)
            for b in range(a + 1, 6)
            if np.isclose(np.linalg.norm(six[a] - six[b]), np.sqrt(2) * dilation)
        ]
        assert len(self.pairs) == 12

    def raw_features(self, image: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        padded = F.pad(image, [d] * 6, mode="replicate")
        size = image.shape[2:]

        def shifted(offset) -> torch.Tensor:
            return padded[(slice(None), slice(None), *(slice(d + o, d + o + s) for o, s in zip(offset, size)))]

        distances = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in self.pairs], dim=1)
        kernel = 2 * self.radius + 1
        distances = F.avg_pool3d(distances, kernel, stride=1, padding=self.radius, count_include_pad=False)
        distances = distances - distances.min(dim=1, keepdim=True).values
        variance = distances.mean(dim=1, keepdim=True)
        mean_variance = variance.mean()
        variance = variance.clamp(min=(mean_variance * 1e-3).item() + 1e-12, max=(mean_variance * 1e3).item() + 1e-12)
        return torch.exp(-distances / variance)


class AnatomixNetwork(torch.nn.Module):
    """The published anatomix 3D U-Net (1 -> 16 channels), layer for layer as its state dict lists them.

    One ``nn.Sequential`` named ``model``: per level two or three (conv 3x3x3 reflect, no bias;
    BatchNorm; ReLU) blocks, max-pooling down and nearest x2 upsampling up. The outputs after
    layers 8, 15, 22, 29 are kept and concatenated in front of the upsampled tensor after layers
    37, 44, 51, 58.
    """

    SKIP_PUSH = (8, 15, 22, 29)
    SKIP_POP = (37, 44, 51, 58)

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = []

        def block(in_channels: int, out_channels: int):
            layers.extend([
                torch.nn.Conv3d(in_channels, out_channels, 3, padding="same", padding_mode="reflect", bias=False),
                torch.nn.BatchNorm3d(out_channels, eps=1e-5, momentum=0.1),
                torch.nn.ReLU(),
            ])

        block(1, 16), block(16, 16), block(16, 16)
        for in_channels, out_channels in ((16, 32), (32, 64), (64, 128), (128, 256)):
            layers.append(torch.nn.MaxPool3d(2, 2))
            block(in_channels, out_channels), block(out_channels, out_channels)
        for in_channels, out_channels in ((256 + 128, 128), (128 + 64, 64), (64 + 32, 32), (32 + 16, 16)):
            layers.append(torch.nn.Upsample(scale_factor=2.0, mode="nearest"))
            block(in_channels, out_channels), block(out_channels, out_channels)
        layers.append(torch.nn.Conv3d(16, 16, 3, padding="same", padding_mode="reflect", bias=False))
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in self.SKIP_PUSH:
                skips.append(x)
            elif index in self.SKIP_POP:
                x = torch.cat([skips.pop(), x], dim=1)
        return x


class Anatomix(FeatureExtractor):
    name = "anatomix"
    version = "1"
    channels = 16
    spatial_multiple = 16

    def __init__(self, weights: str | Path | None = None, cache_dir: Path | None = None):
        path = find_anatomix_weights(weights, cache_dir)
        from .models import load_state_dict_file

        self.network = AnatomixNetwork()
        try:
            self.network.load_state_dict(load_state_dict_file(path), strict=True)
        except RuntimeError as error:
            raise UserInputError(f"{path} is not the anatomix network's weights: {str(error).splitlines()[0]}") from None
        self.network.eval()

    def raw_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)


def find_anatomix_weights(weights: str | Path | None, cache_dir: Path | None) -> Path:
    """The anatomix weights: the given path, $ENTROPYMERGE_ANATOMIX_WEIGHTS, or the cache folder."""
    candidates = [Path(weights)] if weights else []
    if os.environ.get("ENTROPYMERGE_ANATOMIX_WEIGHTS"):
        candidates.append(Path(os.environ["ENTROPYMERGE_ANATOMIX_WEIGHTS"]))
    candidates.append((cache_dir or default_cache_dir()) / "weights" / ANATOMIX_WEIGHTS_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if weights:
        raise UserInputError(f"anatomix weights not found: {weights}")
    raise UserInputError(
        "the anatomix extractor needs its published weights (anatomix.pth, MIT licence, from the anatomix authors); "
        "it never runs with random weights. Pass --anatomix-weights PATH, or download them once with "
        "'entropymerge fetch-weights anatomix --url URL --sha256 HASH' into "
        f"{candidates[-1]}"
    )


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {"mind-ssc": MindSSC, "anatomix": Anatomix}


def get_extractor(name: str, anatomix_weights: str | Path | None = None, cache_dir: Path | None = None) -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise UserInputError(f"unknown feature extractor {name!r}; known: {', '.join(EXTRACTORS)}")
    if name == "anatomix":
        return Anatomix(anatomix_weights, cache_dir)
    return EXTRACTORS[name]()


def check_spec(extractor: FeatureExtractor, spec: FeatureSpec) -> None:
    if (extractor.name, extractor.version, extractor.channels) != (spec.extractor, spec.version, spec.channels):
        raise UserInputError(
            f"the models were trained with {spec.extractor} v{spec.version} ({spec.channels} channels) but this "
            f"engine provides {extractor.name} v{extractor.version} ({extractor.channels} channels)"
        )


class FeatureCache:
    """Feature volumes on disk, keyed by image content and extractor version; oldest pruned past a limit."""

    def __init__(self, folder: Path | None = None, max_bytes: int = 4 << 30):
        self.folder = Path(folder) if folder else default_cache_dir() / "features"
        self.max_bytes = max_bytes

    @staticmethod
    def key(image: torch.Tensor, extractor: FeatureExtractor) -> str:
        digest = hashlib.sha256()
        digest.update(f"{extractor.name}:{extractor.version}:{tuple(image.shape)}".encode())
        digest.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
        return digest.hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.npy"
        try:
            features = torch.from_numpy(np.load(path))
        except (OSError, ValueError):
            return None
        os.utime(path)
        return features

    def store(self, key: str, features: torch.Tensor) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".partial.npy", delete=False) as stream:
                np.save(stream, features.numpy())
            os.replace(stream.name, self.folder / f"{key}.npy")
            self._prune()
        except OSError:
            pass  # an unwritable cache only costs time

    def _prune(self) -> None:
        entries = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for entry in entries:
            total += entry.stat().st_size
            if total > self.max_bytes:
                entry.unlink(missing_ok=True)


@dataclass
class FeatureResult:
    inputs: torch.Tensor  # (1, 1 + C, X, Y, Z)
    cached: bool


def model_inputs(
    image: torch.Tensor,
    spec: FeatureSpec | None,
    extractor: FeatureExtractor | None = None,
    cache: FeatureCache | None = None,
) -> FeatureResult:
    """The model's input for a normalised model-space image (1, X, Y, Z): the image alone without a
    feature spec, else ``cat([image, features])``."""
    image = image.float()[None] if image.ndim == 4 else image.float()
    if spec is None:
        return FeatureResult(image, cached=False)
    extractor = extractor or get_extractor(spec.extractor)
    check_spec(extractor, spec)
    key = FeatureCache.key(image, extractor) if cache else None
    features = cache.load(key) if cache else None
    cached = features is not None and features.shape[2:] == image.shape[2:] and features.shape[1] == spec.channels
    if not cached:
        features = extractor(image)
        if cache:
            cache.store(key, features)
    return FeatureResult(torch.cat([image, features], dim=1), cached=cached)


def fetch_weights(url: str, sha256: str, destination: Path, validate: Callable[[Path], None]) -> Path:
    """Download ``url`` (only when the user asks), check its SHA-256 and contents, then move it into place."""
    sha256 = sha256.lower().strip()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise UserInputError("--sha256 must be the 64 hexadecimal digits of the expected file's SHA-256")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, suffix=".partial", delete=False) as stream:
        partial = Path(stream.name)
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    stream.write(chunk)
        except (OSError, ValueError) as error:
            partial.unlink(missing_ok=True)
            raise UserInputError(f"could not download {url}: {error}") from None
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise UserInputError(f"the file from {url} has SHA-256 {digest.hexdigest()}, not the expected {sha256}; it was discarded")
    try:
        validate(partial)
    except UserInputError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)
    return destination
