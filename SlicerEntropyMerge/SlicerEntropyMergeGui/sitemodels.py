"""The site models part of the panel: listing, adding and removing models, checking them in the background,
and the sample data button."""

import qt
import slicer
from slicer.i18n import tr as _

from SlicerEntropyMergeGui import views
from SlicerEntropyMergeGui.parameters import ReferenceKind


class SiteModelsSection:
    """Reactions of the site models part of the panel, mixed into the module's widget.

    Uses the widget's ``ui``, ``logic``, ``modelCheck``, ``timer``, ``_parameterNode``, ``ensureDependencies``,
    ``appendLog``, ``_checkCanApply`` and ``onApplyButton``.
    """

    def checkModels(self) -> None:
        """Describe the listed models in the background (name, site, labels, compatibility) when the list changed."""
        if self.modelCheck.update(self._parameterNode.modelPaths, self.logic.dependenciesInstalled):
            if self.modelCheck.running:
                self.timer.start()
            self.updateModelsTable()

    def onModelsChecked(self, outcome) -> None:
        if outcome.error is not None:
            self.appendLog(_("Could not check the site models: {message}").format(message=outcome.error))
        else:
            self.ui.deviceLabel.text = _("detected: {device}").format(device=outcome.report.auto_device)
            if self.modelCheck.checked_paths != list(self._parameterNode.modelPaths):
                self._parameterNode.modelPaths = self.modelCheck.checked_paths
        self.updateModelsTable()
        self._checkCanApply()
        if outcome.apply and self.ui.applyButton.enabled:
            self.onApplyButton()

    def updateModelsTable(self) -> None:
        singleModel = views.fill_models_table(self.ui, self.modelCheck.report, list(self._parameterNode.modelPaths),
                                              self.modelCheck.running, self._parameterNode.singleModel)
        if singleModel and singleModel != self._parameterNode.singleModel:
            self._parameterNode.singleModel = singleModel

    def onSingleModelChanged(self, name) -> None:
        self._parameterNode.singleModel = name

    def addModelPaths(self, paths) -> None:
        self.ensureDependencies()  # the chosen paths are kept either way
        self._parameterNode.modelPaths = list(self._parameterNode.modelPaths) + [p for p in paths if p not in self._parameterNode.modelPaths]

    def onAddModelFiles(self) -> None:
        paths = qt.QFileDialog.getOpenFileNames(
            self.parent, _("Add site models"), "",
            _("Site models (*.json *.safetensors *.pt *.pth *.ts);;All files (*)"))
        if paths:
            self.addModelPaths(list(paths))

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Add a folder of site models or a MONAI bundle"))
        if folder:
            self.addModelPaths([folder])

    def onRemoveModels(self) -> None:
        rows = {index.row() for index in self.ui.modelsTable.selectionModel().selectedRows()}
        paths = list(self._parameterNode.modelPaths)
        self._parameterNode.modelPaths = [path for row, path in enumerate(paths) if row not in rows]

    def onLoadSampleData(self) -> None:
        self.ensureDependencies()  # the sample files load without the packages; checking the models needs them
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            volume, reference, models = self.logic.loadSampleData()
            self._parameterNode.inputVolume = volume
            self._parameterNode.referenceLabels = reference
            self._parameterNode.referenceKind = ReferenceKind.reference
            self._parameterNode.modelPaths = models
