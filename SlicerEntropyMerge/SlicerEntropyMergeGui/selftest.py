"""The module's self-test inside 3D Slicer: the sample data through a real run on the CPU, then checks of
the segmentation, the entropy map's geometry and the Dice table (the pytest suite covers the Lib outside it)."""

import json
from pathlib import Path

import slicer
import vtk
from slicer.i18n import tr as _

from SlicerEntropyMergeLib.engine import RunRequest


def sample_apply_on_cpu(test, logic) -> None:
    """Run the bundled sample on the CPU with ``logic`` (the module's logic) and check the results with
    ``test`` (a ``ScriptedLoadableModuleTest``)."""
    import numpy as np

    test.delayDisplay(_("Loading the sample data"))
    logic.ensureDependencies()
    volume, reference, models = logic.loadSampleData()
    job = logic.startRun(volume, RunRequest(models=models, device="cpu"), reference)
    test.assertIsNotNone(job.process)
    job.process.wait(1800)
    test.assertTrue(job.succeeded, job.process.error)
    results = logic.finishRun(job)

    card = json.loads(next(Path(models[0]).glob("*.json")).read_text(encoding="utf-8"))
    contents = results.segmentation.GetSegmentation()
    names = [contents.GetNthSegment(i).GetName() for i in range(contents.GetNumberOfSegments())]
    test.assertEqual(names, [label["name"] for label in card["labels"][1:]])
    volumeShape = slicer.util.arrayFromVolume(volume).shape
    organ = slicer.util.arrayFromSegmentBinaryLabelmap(results.segmentation, names[0], volume)
    test.assertEqual(organ.shape, volumeShape)
    test.assertGreater(int(organ.sum()), 0)

    def ijkToRas(node):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    np.testing.assert_allclose(ijkToRas(results.entropy), ijkToRas(volume), atol=1e-4)
    test.assertEqual(slicer.util.arrayFromVolume(results.entropy).shape, volumeShape)
    test.assertIsNotNone(results.dice)
    test.delayDisplay(_("Test passed"))
