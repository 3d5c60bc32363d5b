"""Keeping library chatter out of the engine's output (the CLI and batch workers share it)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Library chatter (deprecation notices, MONAI's affine warnings) is not for the user."""
    warnings.filterwarnings("ignore")
    logging.getLogger("monai").setLevel(logging.ERROR)
    import SimpleITK

    SimpleITK.ProcessObject.SetGlobalWarningDisplay(False)  # ITK prints warnings straight to stderr
