"""The panel's choices: the parameter node saved with the scene, its enums, and the run request they make.

Defaults are the engine's (``entropymerge.settings``), read here, never repeated.
"""

import enum
from typing import Annotated, Optional, Union

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from entropymerge.methods import METHODS
from entropymerge.settings import ADAPT_METHODS, AdaptationSettings, InferenceOverrides, MergeSettings, OutputSettings, ProbeSettings, RankingSettings
from SlicerEntropyMergeLib.engine import RunRequest, parse_roi_size


class MethodLabel:
    def label(self):
        return _(METHODS[self.value].label)


# The engine's merge-method registry (importable without torch) is the one list; the panel offers the methods
# that need no reference segmentation.
Method = enum.Enum("Method", [(m.name, m.name) for m in METHODS.values() if not m.needs_reference], type=MethodLabel)


class Device(enum.Enum):
    auto = "auto"
    gpu = "cuda"
    cpu = "cpu"

    def label(self):
        return {Device.auto: _("auto (GPU when present)"), Device.gpu: _("GPU"), Device.cpu: _("CPU")}[self]


class AdaptationLabel:
    def label(self):
        return {"none": _("none"), "tent": _("TENT"), "dsbr": _("DSBR (collapse-safe)")}.get(self.value, self.value)


# The engine's adaptation methods are the one list (a new one reaches the panel, with its name as the label).
Adaptation = enum.Enum("Adaptation", [(m, m) for m in ADAPT_METHODS], type=AdaptationLabel)


class ReferenceKind(enum.Enum):
    reference = "reference"
    scribbles = "scribbles"

    def label(self):
        return {ReferenceKind.reference: _("reference segmentation"), ReferenceKind.scribbles: _("scribbles")}[self]


# The overlap slider's minimum, one step below 0: the model card's overlap.
CARD_OVERLAP = -0.05


@parameterNodeWrapper
class SlicerEntropyMergeParameterNode:
    """The panel's choices, saved with the scene.

    ``overlap`` at its minimum, ``adaptSteps`` and ``adaptLearningRate`` at 0 and an empty ``roiSize``
    leave the choice to the model card or the engine.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPaths: list[str]
    method: Method = Method(MergeSettings.method)
    singleModel: str = ""
    temperature: Annotated[float, WithinRange(0.001, 10.0)] = MergeSettings.temperature
    decoupleHead: bool = MergeSettings.decouple_head
    device: Device = Device(InferenceOverrides.device)
    roiSize: str = ""
    overlap: Annotated[float, WithinRange(CARD_OVERLAP, 0.95)] = CARD_OVERLAP
    probePatches: Annotated[int, WithinRange(1, 64)] = ProbeSettings.patches
    adaptation: Adaptation = Adaptation(AdaptationSettings.method)
    adaptSteps: Annotated[int, WithinRange(0, 1000)] = 0
    adaptLearningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    outputSegmentation: vtkMRMLSegmentationNode
    entropyMap: bool = True
    perModel: bool = OutputSettings.per_model
    rank: bool = RankingSettings.rank
    referenceLabels: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    referenceKind: ReferenceKind = ReferenceKind.reference
    caseFolder: str = ""


def run_request(parameters: SlicerEntropyMergeParameterNode) -> RunRequest:
    """The engine run the panel's choices ask for (the reference is added when the run starts).

    Raises ``ValueError`` with the reason for an ROI size that is not three positive whole numbers.
    """
    return RunRequest(
        models=list(parameters.modelPaths),
        method=parameters.method.value,
        single_model=parameters.singleModel or None,
        temperature=parameters.temperature,
        decouple_head=parameters.decoupleHead,
        device=parameters.device.value,
        roi_size=parse_roi_size(parameters.roiSize),
        overlap=parameters.overlap if parameters.overlap >= 0 else None,
        probe_patches=parameters.probePatches,
        adapt=parameters.adaptation.value,
        adapt_steps=parameters.adaptSteps or None,
        adapt_lr=parameters.adaptLearningRate or None,
        per_model=parameters.perModel,
        rank=parameters.rank,
    )
