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
    """Folder of the bundled site models: ``dropgen`` (image + MIND-SSC features) or ``image-only``."""
    folder = SAMPLES / "models" / kind
    if not folder.is_dir():
        raise UserInputError(f"the bundled sample models ({kind}) are missing: {folder}")
    return folder


@dataclass(frozen=True)
class SampleTarget:
    name: str
    image: Path
    labels: Path


def bundled_targets() -> list[SampleTarget]:
    """The bundled target volumes from unseen sites, with their ground truth."""
    images = sorted((SAMPLES / "targets").glob("*_image.nii.gz"))
    if not images:
        raise UserInputError(f"the bundled sample targets are missing: {SAMPLES / 'targets'}")
    return [SampleTarget(p.name[: -len("_image.nii.gz")], p, p.with_name(p.name.replace("_image", "_labels"))) for p in images]
