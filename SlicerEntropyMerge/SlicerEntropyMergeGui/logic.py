"""What the engine needs installed, through the package helpers of the Slicer release at hand."""

from pathlib import Path

import slicer

from SlicerEntropyMergeLib.dependencies import package_tools

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def slicer_package_tools():
    """Slicer's package helpers: ``slicer.packaging`` where it exists (5.12+), else the 5.8-5.10 ones, and
    the PyTorch extension's ``PyTorchUtils`` when it is installed."""
    try:
        from slicer import packaging
    except ImportError:
        packaging = None
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    return package_tools(packaging, slicer.util, PyTorchUtils)
