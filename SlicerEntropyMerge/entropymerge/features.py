"""DropGen stable-feature channels: domain-stable representations computed from the image.

A model trained with DropGen takes ``cat([image, F(image)])``: the normalised image plus the
channels of a frozen extractor F, each normalised per volume (z-score, as an instance norm without
affine). Extractors live in a registry by name:

- ``mind-ssc``: the MIND self-similarity-context descriptor (Heinrich et al., MICCAI 2013), 12
  channels, no weights. Squared patch differences make it blind to intensity offset, scale and
  inversion, so it stays put when a scanner's contrast changes.
- ``anatomix``: the published frozen 3D U-Net (1 -> 16 channels, ``anatomix.AnatomixNetwork``), built to
  match its state-dict layout exactly; it runs only with its real weights, never with random ones.

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

from .anatomix import AnatomixNetwork
from .errors import UserInputError
from .modelcard import FeatureSpec
from .padding import pad_to_multiple

ANATOMIX_WEIGHTS_NAME = "anatomix.pth"


def default_cache_dir() -> Path:
    """$ENTROPYMERGE_CACHE, else ``$XDG_CACHE_HOME/entropymerge``, else ``~/.cache/entropymerge``."""
    base = os.environ.get("ENTROPYMERGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "entropymerge")
    return Path(base)


def instance_normalize(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Z-score each channel over its volume (instance norm without affine).

    Args:
        features: (N, C, X, Y, Z).
        eps: added to the standard deviation (population, not sample).

    Returns:
        (N, C, X, Y, Z) with zero mean and unit variance per (n, c).
    """
    dims = tuple(range(2, features.ndim))
    mean = features.mean(dim=dims, keepdim=True)
    std = features.std(dim=dims, keepdim=True, unbiased=False)
    return (features - mean) / (std + eps)


class FeatureExtractor:
    """A frozen map from a normalised image (1, 1, X, Y, Z) to raw feature channels (1, C, X, Y, Z).

    Subclasses set ``name``, ``version`` (bumped whenever the features change: cached features and
    model cards name it), ``channels`` (C) and ``spatial_multiple`` (the input sizes they need, in
    voxels), and implement ``raw_features``.
    """

    name: str = ""
    version: str = ""
    channels: int = 0
    spatial_multiple: int = 1

    def raw_features(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, X, Y, Z), sizes multiples of ``spatial_multiple`` -> (1, C, X, Y, Z), not normalised."""
        raise NotImplementedError

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised features of an image.

        Args:
            image: (1, 1, X, Y, Z) model-space image; padded (edge values) to ``spatial_multiple``
                for the extractor and cropped back.

        Returns:
            (1, C, X, Y, Z) float32, each channel z-scored over the volume (``instance_normalize``).
        """
        padded, crop = pad_to_multiple(image.float(), self.spatial_multiple)
        with torch.inference_mode():
            features = self.raw_features(padded)[crop]
        return instance_normalize(features)

    @property
    def spec(self) -> FeatureSpec:
        """The ``FeatureSpec`` a model card records for models trained on these features."""
        return FeatureSpec(self.name, self.version, self.channels)


class MindSSC(FeatureExtractor):
    """MIND self-similarity context: 12 channels from patch distances between pairs of the six-neighbourhood.

    For each of the 12 pairs of six-neighbourhood offsets that lie sqrt(2) * dilation apart,
    D = box-filtered squared difference of the image shifted by the two offsets; then
    MIND = exp(-(D - min_pairs D) / V) with V the mean over pairs (clamped), as in Heinrich et al.

    Args:
        radius: half-width of the box filter over squared differences, voxels.
        dilation: distance of the six-neighbourhood offsets from the centre, voxels.
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


class Anatomix(FeatureExtractor):
    """The anatomix features: 16 channels of the frozen ``AnatomixNetwork`` with its published weights.

    Args:
        weights: the weights file; None to look for it (see ``find_anatomix_weights``).
        cache_dir: the cache folder searched for ``weights/anatomix.pth``; None for ``default_cache_dir()``.

    Raises:
        UserInputError: the weights are not found, not readable as plain weights, or not anatomix's.
    """

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
    """Find the anatomix weights file.

    Args:
        weights: a path the user gave; None to search.
        cache_dir: the cache folder; None for ``default_cache_dir()``.

    Returns:
        The first existing file of: ``weights``, $ENTROPYMERGE_ANATOMIX_WEIGHTS,
        ``<cache>/weights/anatomix.pth``.

    Raises:
        UserInputError: none exists (the message says how to get them; random weights are never used).
    """
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
    """The extractor registered in ``EXTRACTORS`` as ``name``.

    Args:
        name: ``"mind-ssc"`` or ``"anatomix"``.
        anatomix_weights, cache_dir: where the anatomix weights are (see ``Anatomix``); unused otherwise.

    Raises:
        UserInputError: an unknown name, or anatomix weights that cannot be found or loaded.
    """
    if name not in EXTRACTORS:
        raise UserInputError(f"unknown feature extractor {name!r}; known: {', '.join(EXTRACTORS)}")
    if name == "anatomix":
        return Anatomix(anatomix_weights, cache_dir)
    return EXTRACTORS[name]()


def check_spec(extractor: FeatureExtractor, spec: FeatureSpec) -> None:
    """Raise ``UserInputError`` unless ``extractor`` gives the features (name, version, channel count) a model card names."""
    if (extractor.name, extractor.version, extractor.channels) != (spec.extractor, spec.version, spec.channels):
        raise UserInputError(
            f"the models were trained with {spec.extractor} v{spec.version} ({spec.channels} channels) but this "
            f"engine provides {extractor.name} v{extractor.version} ({extractor.channels} channels)"
        )


class FeatureCache:
    """Feature volumes on disk (``<key>.npy``), keyed by image content and extractor version.

    Args:
        folder: where the files go; None for ``default_cache_dir() / "features"``.
        max_bytes: past this total, the least recently used files are removed (default 4 GiB).
    """

    def __init__(self, folder: Path | None = None, max_bytes: int = 4 << 30):
        self.folder = Path(folder) if folder else default_cache_dir() / "features"
        self.max_bytes = max_bytes

    @staticmethod
    def key(image: torch.Tensor, extractor: FeatureExtractor) -> str:
        """SHA-256 (hex) of the extractor's name and version, the image's shape and its float32 voxels."""
        digest = hashlib.sha256()
        digest.update(f"{extractor.name}:{extractor.version}:{tuple(image.shape)}".encode())
        digest.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
        return digest.hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        """The cached (1, C, X, Y, Z) features under ``key`` (marked as used); None when absent or unreadable."""
        path = self.folder / f"{key}.npy"
        try:
            features = torch.from_numpy(np.load(path))
        except (OSError, ValueError):
            return None
        os.utime(path)
        return features

    def store(self, key: str, features: torch.Tensor) -> None:
        """Write ``features`` under ``key`` atomically and prune the cache; an unwritable cache is skipped silently."""
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
    """A model's input for one image, and whether its features came from the cache."""

    inputs: torch.Tensor  # (1, 1 + C, X, Y, Z)
    cached: bool


def model_inputs(
    image: torch.Tensor,
    spec: FeatureSpec | None,
    extractor: FeatureExtractor | None = None,
    cache: FeatureCache | None = None,
) -> FeatureResult:
    """The model's input for a normalised model-space image.

    Args:
        image: (1, X, Y, Z) or (1, 1, X, Y, Z) model-space image.
        spec: the card's stable-feature spec; None for an image-only model.
        extractor: the extractor to use; None to build the one ``spec`` names.
        cache: where features are looked up and stored; None to always compute them.

    Returns:
        A ``FeatureResult`` whose ``inputs`` are (1, 1 + C, X, Y, Z): the image, then its C feature
        channels ((1, 1, X, Y, Z) without a spec).

    Raises:
        UserInputError: the extractor does not match ``spec``, or cannot be built.
    """
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
    """Download ``url`` (only when the user asks), check its SHA-256 and contents, then move it into place.

    Args:
        url: where to download from (60 s timeout).
        sha256: the expected SHA-256 of the file, 64 hexadecimal digits.
        destination: the final path; its folder is made if needed.
        validate: called on the downloaded file; raises ``UserInputError`` when its contents are wrong.

    Returns:
        ``destination``.

    Raises:
        UserInputError: a malformed ``sha256``, a failed download, a different hash, or a failed
            validation; the partial download is removed.
    """
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
