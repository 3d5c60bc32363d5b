"""The Python packages the engine needs inside 3D Slicer: checked without asking, installed after one question.

Slicer 5.12 and later offer ``slicer.packaging`` (``pip_check``, ``pip_ensure``); Slicer 5.8 and 5.10
offer ``slicer.util.pip_install`` and ship ``packaging`` and ``importlib.metadata``. ``package_tools``
turns whichever is there into one ``PackageTools``, so ``ensure_dependencies`` is the same code on
every release and is tested outside Slicer with stand-ins for what only Slicer provides.

PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the build for the local
GPU; the other packages come from pip. A package Slicer already ships (SimpleITK, numpy) is never
reinstalled while its version meets the requirement, so pip does not replace Slicer's own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from . import tr as _

TORCH = "torch"


class DependencyError(RuntimeError):
    """What the module needs is not installed and will not be now; the message says why and what to do."""


@dataclass
class PackageTools:
    """What the running Slicer offers to check and install Python packages.

    ``is_installed`` answers for one requirement string (``"monai>=1.3"``) without asking anything;
    ``install`` pip-installs requirement strings; ``confirm(message, details)`` asks the user (True: go
    ahead); ``install_torch(specifier)`` installs PyTorch through the PyTorch extension and says
    whether it did, and is ``None`` when that extension is missing.
    """

    is_installed: Callable[[str], bool]
    install: Callable[[List[str]], None]
    confirm: Callable[[str, str], bool]
    install_torch: Optional[Callable[[str], bool]] = None


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements file (comments, blank lines and pip options left out)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip() and not line.lstrip().startswith("-")]


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement string (``"SimpleITK>=2.2"`` -> ``"SimpleITK"``)."""
    for index, character in enumerate(requirement):
        if not (character.isalnum() or character in "-_."):
            return requirement[:index].strip()
    return requirement.strip()


def requirement_specifier(requirement: str) -> str:
    """The version part of a requirement string (``"torch>=2.2"`` -> ``">=2.2"``)."""
    return requirement[len(requirement_name(requirement)):].strip()


def missing_requirements(requirements: list[str], tools: PackageTools) -> list[str]:
    """The requirements that are not installed at an accepted version."""
    return [requirement for requirement in requirements if not tools.is_installed(requirement)]


def ensure_dependencies(requirements: list[str], tools: PackageTools, requester: str) -> list[str]:
    """Install the missing ``requirements`` after one confirmation; returns what was installed.

    Asks nothing when all are installed. Raises ``DependencyError`` (nothing installed) when the
    user declines, or when PyTorch is missing and the PyTorch extension is not there to install it.
    """
    missing = missing_requirements(requirements, tools)
    if not missing:
        return []
    torch = [requirement for requirement in missing if requirement_name(requirement).lower() == TORCH]
    if torch and tools.install_torch is None:
        raise DependencyError(_(
            "{requester} runs its models with PyTorch, which the PyTorch extension installs: install 'PyTorch' from "
            "the Extensions Manager, restart Slicer and try again.").format(requester=requester))
    message = _("{requester} needs {count} Python package(s) that are not installed yet. Install them now? This changes "
                "Slicer's Python environment and can take several minutes.").format(requester=requester, count=len(missing))
    if not tools.confirm(message, "\n".join(missing)):
        raise DependencyError(_("The Python packages {requester} needs were not installed, so the site models cannot run: "
                                "{packages}.").format(requester=requester, packages=", ".join(missing)))
    if torch and not tools.install_torch(requirement_specifier(torch[0])):
        raise DependencyError(_("PyTorch was not installed, so the site models cannot run."))
    others = [requirement for requirement in missing if requirement not in torch]
    if others:
        tools.install(others)
    return missing


def package_tools(slicer_packaging=None, slicer_util=None, pytorch_utils=None, metadata=None, requirement_class=None) -> PackageTools:
    """``PackageTools`` from what this Slicer has.

    ``slicer_packaging`` is the ``slicer.packaging`` module (Slicer >= 5.12) or ``None`` (5.8, 5.10:
    then ``importlib.metadata`` and ``packaging``'s ``Requirement`` check, ``slicer_util.pip_install``
    installs; the same when the module lacks ``pip_check`` or ``pip_ensure``); ``slicer_util`` gives
    ``confirmOkCancelDisplay``; ``pytorch_utils`` is the PyTorch extension's ``PyTorchUtils`` module or ``None``.
    """
    if slicer_packaging is not None and hasattr(slicer_packaging, "pip_check") and hasattr(slicer_packaging, "pip_ensure"):
        def is_installed(requirement: str) -> bool:
            return bool(slicer_packaging.pip_check(requirement))

        def install(requirements: list[str]) -> None:
            # Asked already; installed even under --testing, where the module's own self-test needs the packages.
            slicer_packaging.pip_ensure(requirements, prompt_install=False, skip_in_testing=False)
    else:
        if metadata is None:
            import importlib.metadata as metadata
        if requirement_class is None:
            from packaging.requirements import Requirement as requirement_class

        def is_installed(requirement: str) -> bool:
            parsed = requirement_class(requirement)
            try:
                version = metadata.version(parsed.name)
            except metadata.PackageNotFoundError:
                return False
            return parsed.specifier.contains(version, prereleases=True)

        def install(requirements: list[str]) -> None:
            slicer_util.pip_install(list(requirements))

    def confirm(message: str, details: str) -> bool:
        return bool(slicer_util.confirmOkCancelDisplay(message, detailedText=details))

    install_torch = None
    if pytorch_utils is not None:
        def install_torch(specifier: str) -> bool:
            # The question was asked already, for every package at once.
            logic = pytorch_utils.PyTorchUtilsLogic()
            return logic.installTorch(askConfirmation=False, torchVersionRequirement=specifier) is not None

    return PackageTools(is_installed, install, confirm, install_torch)
