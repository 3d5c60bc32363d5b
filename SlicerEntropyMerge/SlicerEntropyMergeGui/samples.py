"""The bundled sample data: target scans registered with the Sample Data module, and loaded with their
reference labels and the sample site models."""

from pathlib import Path

import slicer
from slicer.i18n import tr as _

ICON = Path(__file__).resolve().parents[1] / "Resources" / "Icons" / "SlicerEntropyMerge.png"


def register_sample_data() -> None:
    """Register the bundled target scans with the Sample Data module; they load from the extension itself.

    Runs at every Slicer start, so it imports only the standard-library list of sample files.
    """
    import SampleData

    from entropymerge.samplefiles import bundled_targets

    for target in bundled_targets():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=_("Entropy Merge"),
            sampleName=target.name,
            uris=target.image.as_uri(),
            fileNames=target.image.name,
            nodeNames=target.name,
            thumbnailFileName=str(ICON),
            customDownloader=lambda source, path=target.image: slicer.util.loadVolume(str(path), {"name": source.nodeNames[0]}),
        )


def load_sample_data():
    """Load a bundled target scan and its reference labels; returns them and the bundled site models' folder."""
    from entropymerge.samplefiles import bundled_models, bundled_targets

    target = bundled_targets()[0]
    volume = slicer.util.loadVolume(str(target.image), {"name": target.name})
    reference = slicer.util.loadLabelVolume(str(target.labels), {"name": _("{name} reference").format(name=target.name), "show": False})
    return volume, reference, [str(bundled_models())]
