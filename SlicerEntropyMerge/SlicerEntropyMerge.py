"""3D Slicer scripted module of SlicerEntropyMerge (minimal: the full panel comes with the GUI work)."""

import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class SlicerEntropyMerge(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Entropy Merge")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerEntropyMerge developers"]
        self.parent.helpText = _(
            "Merge several sites' segmentation models for the volume at hand with entropy-adaptive "
            "coefficients, and see where the merged model is unsure."
        )
        self.parent.acknowledgementText = _("Built on MONAI, PyTorch and 3D Slicer.")


class SlicerEntropyMergeWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerEntropyMerge.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)


class SlicerEntropyMergeLogic(ScriptedLoadableModuleLogic):
    def engineFolder(self):
        """Folder that holds the engine package (entropymerge) shipped with this module."""
        return os.path.dirname(os.path.abspath(__file__))


class SlicerEntropyMergeTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_engine_present()

    def test_engine_present(self):
        folder = SlicerEntropyMergeLogic().engineFolder()
        self.assertTrue(os.path.isfile(os.path.join(folder, "entropymerge", "__init__.py")))
