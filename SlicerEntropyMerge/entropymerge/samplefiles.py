"""Where the bundled sample assets are (see samples/README.md for how they were made).

Standard library only: the Slicer module lists the sample targets at every Slicer start, before
(and without) the engine's packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError

SAMPLES = Path(__file__).resolve().parent / "samples"


def bundled_models(kind: str = "dropgen") -> Path:
    """Folder of the bundled site models.

    Args:
        kind: ``"dropgen"`` (image + MIND-SSC feature channels) or ``"image-only"``.

    Returns:
        The folder holding the models' cards (``*.json``) and weights (``*.safetensors``).

    Raises:
        UserInputError: the folder is missing (an incomplete installation, or an unknown ``kind``).
    """
    folder = SAMPLES / "models" / kind
    if not folder.is_dir():
        raise UserInputError(f"the bundled sample models ({kind}) are missing: {folder}")
    return folder


@dataclass(frozen=True)
class SampleTarget:
    """One bundled target volume of an unseen site: ``<name>_image.nii.gz`` and its ``<name>_labels.nii.gz``."""

    name: str
    image: Path
    labels: Path


def bundled_targets() -> list[SampleTarget]:
    """The bundled target volumes from unseen sites, with their ground truth.

    Returns:
        One ``SampleTarget`` per ``samples/targets/*_image.nii.gz``, sorted by file name.

    Raises:
        UserInputError: there are no target volumes.
    """
    images = sorted((SAMPLES / "targets").glob("*_image.nii.gz"))
    if not images:
        raise UserInputError(f"the bundled sample targets are missing: {SAMPLES / 'targets'}")
    return [SampleTarget(p.name[: -len("_image.nii.gz")], p, p.with_name(p.name.replace("_image", "_labels"))) for p in images]
