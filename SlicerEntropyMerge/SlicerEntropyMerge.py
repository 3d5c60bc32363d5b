"""3D Slicer module of SlicerEntropyMerge: merge several sites' models for the volume at hand, see the
segmentation, where the merged model is unsure, and which site model fits the case.

The module is thin: the engine (``entropymerge``) runs in a background process started and read by
``SlicerEntropyMergeLib``, which also moves volumes and results between the scene and files. The panel's
parts (parameter node, site models section, views, sample data, self-test) are in ``SlicerEntropyMergeGui``;
the classes Slicer looks up by name (module, widget, logic, test) are here.
"""

from pathlib import Path
from typing import Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SlicerEntropyMergeGui import views
from SlicerEntropyMergeGui.logic import REQUIREMENTS, slicer_package_tools
from SlicerEntropyMergeGui.parameters import ReferenceKind, SlicerEntropyMergeParameterNode, run_request
from SlicerEntropyMergeGui.samples import load_sample_data, register_sample_data
from SlicerEntropyMergeGui.selftest import sample_apply_on_cpu
from SlicerEntropyMergeGui.sitemodels import SiteModelsSection
from SlicerEntropyMergeLib import cases
from SlicerEntropyMergeLib.binding import GuiBinding
from SlicerEntropyMergeLib.dependencies import ensure_dependencies, missing_requirements, read_requirements
from SlicerEntropyMergeLib.engine import RunRequest
from SlicerEntropyMergeLib.job import RunJob, abandon_run, discard_model, finish_run, save_merged_model, start_run
from SlicerEntropyMergeLib.modelcheck import ModelCheck, apply_blocker
from SlicerEntropyMergeLib.scene import case_volume

POLL_INTERVAL_MS = 200
DOCUMENTATION_URL = "https://github.com/SlicerEntropyMerge/SlicerEntropyMerge#use-in-3d-slicer"


class SlicerEntropyMerge(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Entropy Merge")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerEntropyMerge developers"]
        self.parent.helpText = _(
            "Several hospitals fine-tuned the same segmentation network on their own scanners. For the volume at "
            "hand, this module merges their models with coefficients set by how unsure each one is on it, runs the "
            "merged model once, and shows the segmentation, an entropy map of where the merged model is unsure, "
            "the merging coefficients, and which site model fits the case best. Pick a volume and site models (or "
            "load the sample data), press Apply; Cancel stops the run at any time."
        )
        self.parent.helpText += "<p>" + _('See the <a href="{url}">documentation</a>.').format(url=DOCUMENTATION_URL) + "</p>"
        self.parent.acknowledgementText = _(
            "Built on MONAI, PyTorch and 3D Slicer. The sample data and sample site models are synthetic, made by "
            "the extension's own engine."
        )
        slicer.app.connect("startupCompleted()", register_sample_data)


class SlicerEntropyMergeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, SiteModelsSection):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self.binding = None  # the panel's connection to the parameter node, made once per node
        self.job: Optional[RunJob] = None
        self.modelCheck = ModelCheck()
        self.caseFiles: list[Path] = []
        self.caseIndex = -1
        self.caseVolume = None
        self.lastProgressMessage = ""
        self.mergedModel: Optional[Path] = None  # the last run's merged network, for "Save merged model..."

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerEntropyMerge.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.binding = GuiBinding(self.ui)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerEntropyMergeLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelsTable.horizontalHeader().setStretchLastSection(True)
        self.ui.addModelFileButton.connect("clicked(bool)", self.onAddModelFiles)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModels)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleData)
        self.ui.singleModelComboBox.connect("currentTextChanged(QString)", self.onSingleModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showChartButton.connect("clicked(bool)", self.onShowChart)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.caseFolderButton.connect("directoryChanged(QString)", self.onCaseFolderChanged)
        self.ui.previousCaseButton.connect("clicked(bool)", lambda: self.goToCase(self.caseIndex - 1))
        self.ui.nextCaseButton.connect("clicked(bool)", lambda: self.goToCase(self.caseIndex + 1))

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.rankingChart = None
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.stopBackgroundWork()
        discard_model(self.mergedModel)

    def stopBackgroundWork(self) -> None:
        """Cancel the run and the model check, if any (the module closes, or the scene they work on does)."""
        self.timer.stop()
        if self.job:
            abandon_run(self.job)
            self.job = None
        self.modelCheck.reset()
        self.caseVolume = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # The panel stays connected to its parameter node (see GuiBinding); only the reactions to changes stop.
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.stopBackgroundWork()
        self.setParameterNode(None)
        self.binding.unbind()
        self.setRunning(False)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if self._parameterNode.caseFolder and not self.caseFiles:
            self.ui.caseFolderButton.directory = self._parameterNode.caseFolder  # lists the cases again

    def setParameterNode(self, inputParameterNode: Optional[SlicerEntropyMergeParameterNode]) -> None:
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        if inputParameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are connected to the parameter of that name.
            inputParameterNode = self.binding.bind(inputParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.checkModels()
        self._checkCanApply()

    def ensureDependencies(self) -> bool:
        """Install what the engine needs (asks first); False, after telling the user why, when it is not there now."""
        try:
            with slicer.util.tryWithErrorDisplay(_("The packages Entropy Merge needs are not installed."), waitCursor=True):
                self.logic.ensureDependencies()
        except Exception:  # shown to the user already; the panel goes on, and Apply asks again
            return False
        return True

    # Apply, progress, cancel

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.job:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the run; nothing it made is kept")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        parameters = self._parameterNode
        if parameters is None:
            reason = _("Select a target volume.")
        else:
            reason = apply_blocker(self.modelCheck, bool(parameters.inputVolume), list(parameters.modelPaths), parameters.method.value,
                                   parameters.method.label(), parameters.rank, parameters.singleModel, parameters.roiSize)
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Segment the volume with the merged site models")

    def onApplyButton(self) -> None:
        if self.job:
            self.cancelRun()
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if self.modelCheck.report is None:
                self.modelCheck.request_apply(self._parameterNode.modelPaths, can_run=lambda: True)
                self.timer.start()
                self.updateModelsTable()
                self._checkCanApply()
                self.ui.statusLabel.text = _("Checking the site models...")
                return
            self.startRun()

    def startRun(self) -> None:
        parameters = self._parameterNode
        case = self.caseFiles[self.caseIndex] if self.caseVolume is not None and parameters.inputVolume == self.caseVolume else None
        labelValues = {label["name"]: label["value"] for label in self.modelCheck.report.labels}
        self.job = self.logic.startRun(parameters.inputVolume, run_request(parameters), parameters.referenceLabels, labelValues,
                                       parameters.referenceKind == ReferenceKind.scribbles, case)
        self.ui.logTextEdit.clear()
        self.lastProgressMessage = ""
        self.ui.progressBar.value = 0
        self.setRunning(True)
        if self.job.process is None:
            self.appendLog(_("Reusing the results saved next to the case: {folder}").format(folder=self.job.out))
            self.onRunFinished()
        else:
            self.ui.statusLabel.text = _("Starting the engine...")
            self.timer.start()

    def onTimer(self) -> None:
        outcome = self.modelCheck.poll()
        if outcome is not None:
            self.onModelsChecked(outcome)
        if self.job and self.job.process:
            for event in self.job.process.poll():
                self.logEvent(event)
            self.ui.progressBar.value = int(round(100 * self.job.process.fraction))
            if self.job.process.message:
                self.ui.statusLabel.text = self.job.process.message
            if self.job.finished:
                self.onRunFinished()
        if not self.modelCheck.running and not self.job:
            self.timer.stop()

    def onRunFinished(self) -> None:
        job, self.job = self.job, None
        try:
            if not job.succeeded:
                abandon_run(job)
                self.ui.statusLabel.text = _("Failed: {message}").format(message=job.process.error)
                self.appendLog(job.process.error)
                return
            with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
                results = self.logic.finishRun(job, self._parameterNode.outputSegmentation, self._parameterNode.entropyMap)
                if not self._parameterNode.outputSegmentation:
                    self._parameterNode.outputSegmentation = results.segmentation
                self.showResults(job.volume, results)
                discard_model(self.mergedModel)
                self.mergedModel = job.model
                self.ui.saveModelButton.enabled = job.model is not None
                self.ui.progressBar.value = 100
                self.ui.statusLabel.text = _("Done: {name} segmented.").format(name=job.volume.GetName())
        finally:
            self.setRunning(False)

    def cancelRun(self) -> None:
        job, self.job = self.job, None
        abandon_run(job)
        self.ui.statusLabel.text = _("Cancelled.")
        self.appendLog(_("Cancelled by the user; nothing of this run was kept."))
        self.setRunning(False)

    def setRunning(self, running: bool) -> None:
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.updateCaseButtons()
        self._checkCanApply()

    def logEvent(self, event) -> None:
        if event.kind == "progress":
            if event.message != self.lastProgressMessage:
                self.lastProgressMessage = event.message
                self.appendLog(f"{int(round(100 * (event.fraction or 0))):3d}%  {event.message}")
        elif event.kind == "log":
            self.appendLog(f"{event.level}: {event.message}")
        elif event.kind in ("stderr", "text") and event.message.strip():
            self.appendLog(event.message)

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # Results

    def showResults(self, volume, results) -> None:
        views.show_results(self.ui, volume, results)
        self.rankingChart = results.ranking_chart
        if self.rankingChart is not None:
            self.onShowChart()

    def onSaveModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the merged model"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the merged model."), waitCursor=True):
            card = save_merged_model(self.mergedModel, folder)
            self.ui.statusLabel.text = _("Merged model saved: {path}").format(path=card)

    def onShowChart(self) -> None:
        slicer.modules.plots.logic().ShowChartInLayout(self.rankingChart)

    # Case list

    def onCaseFolderChanged(self, folder) -> None:
        self._parameterNode.caseFolder = folder
        self.caseFiles = cases.find_cases(folder) if folder else []
        self.caseIndex, self.caseVolume = -1, None
        self.updateCaseButtons()

    def updateCaseButtons(self) -> None:
        folderChosen = bool(self._parameterNode and self._parameterNode.caseFolder)
        self.ui.caseLabel.text = views.case_label(self.caseFiles, self.caseIndex, folderChosen)
        count = len(self.caseFiles)
        idle = self.job is None
        self.ui.previousCaseButton.enabled = idle and self.caseIndex > 0
        self.ui.nextCaseButton.enabled = idle and self.caseIndex + 1 < count

    def goToCase(self, index: int) -> None:
        """Load case ``index`` as the target volume and segment it (its saved results are reused when they match)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the case."), waitCursor=True):
            # A case visited before is shown again, not loaded again (its results are found by their volume).
            self.caseVolume = case_volume(slicer.mrmlScene, self.caseFiles[index], lambda path: slicer.util.loadVolume(str(path)))
            self.caseIndex = index
            self._parameterNode.inputVolume = self.caseVolume
            self._parameterNode.outputSegmentation = None
            self.updateCaseButtons()
        if self.ui.applyButton.enabled:
            self.onApplyButton()


class SlicerEntropyMergeLogic(ScriptedLoadableModuleLogic):
    """Dependencies, sample data, and runs on the application scene (the work itself is in SlicerEntropyMergeLib)."""

    def getParameterNode(self):
        return SlicerEntropyMergeParameterNode(super().getParameterNode())

    def dependenciesInstalled(self) -> bool:
        """Whether PyTorch and the engine's packages are all there (asks nothing)."""
        return not missing_requirements(read_requirements(REQUIREMENTS), slicer_package_tools())

    def ensureDependencies(self) -> None:
        """Install what is missing after one question: PyTorch through the PyTorch extension, the rest with pip.

        Nothing is asked when everything is installed. Raises ``DependencyError`` with the reason when
        the user declines or the PyTorch extension is missing.
        """
        ensure_dependencies(read_requirements(REQUIREMENTS), slicer_package_tools(), _("Entropy Merge"))

    def loadSampleData(self):
        """Load a bundled target scan and its reference labels; returns them and the bundled site models' folder."""
        return load_sample_data()

    def startRun(self, volume, request: RunRequest, labels=None, labelValues=None, scribbles=False, case=None) -> RunJob:
        return start_run(slicer.mrmlScene, volume, request, labels, labelValues, scribbles, case, slicer.app.temporaryPath)

    def finishRun(self, job: RunJob, segmentation=None, entropy=True):
        return finish_run(slicer.mrmlScene, job, segmentation, entropy)


class SlicerEntropyMergeTest(ScriptedLoadableModuleTest):
    """Runs inside 3D Slicer (the pytest suite in Testing/ covers the Lib outside it)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_sample_apply_on_cpu()

    def test_sample_apply_on_cpu(self):
        sample_apply_on_cpu(self, SlicerEntropyMergeLogic())
