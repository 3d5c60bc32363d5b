"""The module's package handling on every supported Slicer: the 5.12 ``slicer.packaging`` API and the 5.8-5.10
fallback (``slicer.util.pip_install``, ``importlib.metadata``, ``packaging``).

What only Slicer provides (its package helpers, its dialogs, the PyTorch extension) is replaced by test
doubles named ``...StandIn``; the requirement checks use the real ``packaging`` library and, in one test,
the real ``importlib.metadata`` of this environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from SlicerEntropyMergeLib.dependencies import (
    DependencyError,
    ensure_dependencies,
    missing_requirements,
    package_tools,
    read_requirements,
    requirement_name,
    requirement_specifier,
)

REQUIREMENTS = Path(__file__).resolve().parents[1] / "SlicerEntropyMerge" / "Resources" / "requirements.txt"
# A Slicer 5.8 without the engine's extra packages: what it bundles (numpy 1.26, scipy 1.13, SimpleITK 2.2).
SLICER_58 = {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.2.1"}
EVERYTHING = {**SLICER_58, "torch": "2.5.1", "monai": "1.4.0", "nibabel": "5.3.2", "safetensors": "0.4.5", "PyYAML": "6.0.2",
              "matplotlib": "3.9.2", "tqdm": "4.67.1"}


class Environment:
    """The installed distributions of a stand-in Slicer, by name (what pip would change)."""

    def __init__(self, installed: dict[str, str]):
        self.installed = {name.lower(): version for name, version in installed.items()}

    def satisfies(self, requirement: str) -> bool:
        parsed = Requirement(requirement)
        version = self.installed.get(parsed.name.lower())
        return version is not None and parsed.specifier.contains(version, prereleases=True)

    def pip(self, requirements: list[str]) -> None:
        for requirement in requirements:
            self.installed[Requirement(requirement).name.lower()] = "99.0"


class MetadataStandIn:
    """``importlib.metadata`` of a stand-in Slicer (5.8-5.10 fallback)."""

    class PackageNotFoundError(Exception):
        pass

    def __init__(self, environment: Environment):
        self.environment = environment

    def version(self, name: str) -> str:
        try:
            return self.environment.installed[name.lower()]
        except KeyError:
            raise self.PackageNotFoundError(name) from None


class SlicerPackagingStandIn:
    """``slicer.packaging`` of Slicer 5.12: ``pip_check`` and ``pip_ensure``."""

    def __init__(self, environment: Environment):
        self.environment = environment
        self.ensured: list[tuple[list[str], dict]] = []

    def pip_check(self, requirement) -> bool:
        return self.environment.satisfies(str(requirement))

    def pip_ensure(self, requirements, **options) -> None:
        self.ensured.append((list(requirements), options))
        self.environment.pip([str(requirement) for requirement in requirements])


class SlicerUtilStandIn:
    """``slicer.util``: ``pip_install`` (all releases) and ``confirmOkCancelDisplay``, answering as told."""

    def __init__(self, environment: Environment, answer: bool = True):
        self.environment = environment
        self.answer = answer
        self.questions: list[tuple[str, str]] = []
        self.pip_installed: list[list[str]] = []

    def confirmOkCancelDisplay(self, text, windowTitle=None, parent=None, **kwargs) -> bool:
        self.questions.append((text, kwargs.get("detailedText", "")))
        return self.answer

    def pip_install(self, requirements) -> None:
        assert isinstance(requirements, list), "a list keeps each requirement one argument"
        self.pip_installed.append(requirements)
        self.environment.pip(requirements)


class PyTorchUtilsStandIn:
    """The PyTorch extension's ``PyTorchUtils`` module; ``succeeds`` False: its installer returned None."""

    def __init__(self, environment: Environment, succeeds: bool = True):
        self.environment = environment
        self.succeeds = succeeds
        self.calls: list[dict] = []
        stand_in = self

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, **_):
                stand_in.calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
                if not stand_in.succeeds:
                    return None
                stand_in.environment.pip([f"torch{torchVersionRequirement}"])
                return object()

        self.PyTorchUtilsLogic = PyTorchUtilsLogic


def slicer_512(installed, answer=True, pytorch=True, torch_succeeds=True):
    environment = Environment(installed)
    packaging, util = SlicerPackagingStandIn(environment), SlicerUtilStandIn(environment, answer)
    torch = PyTorchUtilsStandIn(environment, torch_succeeds) if pytorch else None
    return environment, packaging, util, torch, package_tools(packaging, util, torch)


def slicer_58(installed, answer=True, pytorch=True, torch_succeeds=True):
    environment = Environment(installed)
    util = SlicerUtilStandIn(environment, answer)
    torch = PyTorchUtilsStandIn(environment, torch_succeeds) if pytorch else None
    return environment, None, util, torch, package_tools(None, util, torch, metadata=MetadataStandIn(environment))


SLICERS = {"5.12 slicer.packaging": slicer_512, "5.8-5.10 fallback": slicer_58}


def test_requirements_file_is_read_as_requirement_strings():
    requirements = read_requirements(REQUIREMENTS)
    assert requirements[0] == "torch>=2.2" and "SimpleITK>=2.2" in requirements
    assert [requirement_name(r) for r in requirements[:4]] == ["torch", "monai", "numpy", "SimpleITK"]
    assert requirement_specifier("torch>=2.2") == ">=2.2" and requirement_specifier("tqdm") == ""


def test_the_simpleitk_requirement_accepts_the_copy_slicer_58_bundles():
    # Otherwise pip would replace Slicer's own SimpleITK (2.2.x in Slicer 5.8) on first use.
    simpleitk = next(Requirement(r) for r in read_requirements(REQUIREMENTS) if requirement_name(r) == "SimpleITK")
    assert simpleitk.specifier.contains("2.2.1")


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_nothing_is_asked_or_installed_when_everything_is_there(slicer):
    environment, packaging, util, torch, tools = slicer(EVERYTHING)
    assert ensure_dependencies(read_requirements(REQUIREMENTS), tools, "Entropy Merge") == []
    assert util.questions == [] and util.pip_installed == [] and torch.calls == []
    assert packaging is None or packaging.ensured == []


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_one_question_then_torch_from_the_extension_and_the_rest_from_pip(slicer):
    environment, packaging, util, torch, tools = slicer(SLICER_58)
    requirements = read_requirements(REQUIREMENTS)
    installed = ensure_dependencies(requirements, tools, "Entropy Merge")
    expected_pip = ["monai>=1.3", "nibabel>=5.0", "safetensors>=0.4", "PyYAML>=6.0", "matplotlib>=3.7", "tqdm>=4.60"]
    assert installed == ["torch>=2.2"] + expected_pip
    assert len(util.questions) == 1
    message, details = util.questions[0]
    assert "Entropy Merge needs 7 Python package(s)" in message
    assert details.splitlines() == ["torch>=2.2"] + expected_pip
    assert torch.calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.2"}]
    if packaging is not None:
        assert packaging.ensured == [(expected_pip, {"prompt_install": False, "skip_in_testing": False})]
        assert util.pip_installed == []
    else:
        assert util.pip_installed == [expected_pip]
    assert environment.installed["simpleitk"] == "2.2.1", "Slicer's SimpleITK is left alone"
    assert missing_requirements(requirements, tools) == []


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_the_user_declines_and_nothing_is_installed(slicer):
    environment, packaging, util, torch, tools = slicer(SLICER_58, answer=False)
    with pytest.raises(DependencyError, match=r"The Python packages Entropy Merge needs were not installed, so the site models "
                                              r"cannot run: torch>=2\.2, monai>=1\.3"):
        ensure_dependencies(read_requirements(REQUIREMENTS), tools, "Entropy Merge")
    assert len(util.questions) == 1 and torch.calls == [] and util.pip_installed == []
    assert packaging is None or packaging.ensured == []
    assert environment.installed == Environment(SLICER_58).installed


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_torch_missing_without_the_pytorch_extension_says_what_to_install(slicer):
    environment, packaging, util, torch, tools = slicer(SLICER_58, pytorch=False)
    with pytest.raises(DependencyError, match="install 'PyTorch' from the Extensions Manager, restart Slicer"):
        ensure_dependencies(read_requirements(REQUIREMENTS), tools, "Entropy Merge")
    assert util.questions == [] and util.pip_installed == []
    assert packaging is None or packaging.ensured == []


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_without_the_pytorch_extension_the_other_packages_still_install_when_torch_is_there(slicer):
    environment, packaging, util, torch, tools = slicer({**SLICER_58, "torch": "2.5.1"}, pytorch=False)
    assert "torch>=2.2" not in ensure_dependencies(read_requirements(REQUIREMENTS), tools, "Entropy Merge")
    assert missing_requirements(read_requirements(REQUIREMENTS), tools) == []


@pytest.mark.parametrize("slicer", SLICERS.values(), ids=SLICERS.keys())
def test_a_failed_pytorch_install_stops_before_pip(slicer):
    environment, packaging, util, torch, tools = slicer(SLICER_58, torch_succeeds=False)
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        ensure_dependencies(read_requirements(REQUIREMENTS), tools, "Entropy Merge")
    assert util.pip_installed == [] and (packaging is None or packaging.ensured == [])


def test_a_slicer_packaging_without_pip_check_uses_the_fallback():
    environment = Environment(SLICER_58)

    class LaterPackagingStandIn:  # a slicer.packaging with another API: not trusted to have pip_check/pip_ensure
        pass

    util = SlicerUtilStandIn(environment)
    tools = package_tools(LaterPackagingStandIn(), util, None, metadata=MetadataStandIn(environment))
    tools.install(["nibabel>=5.0"])
    assert util.pip_installed == [["nibabel>=5.0"]] and tools.is_installed("nibabel>=5.0")


def test_the_fallback_check_reads_the_real_installed_metadata():
    tools = package_tools(None, SlicerUtilStandIn(Environment({})), None)  # real importlib.metadata and packaging
    assert tools.is_installed("numpy>=1.0")
    assert not tools.is_installed("numpy<1.0")
    assert not tools.is_installed("no-such-distribution-entropymerge>=1")
