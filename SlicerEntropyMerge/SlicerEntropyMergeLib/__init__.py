"""Slicer-free helpers of the SlicerEntropyMerge module (MRML, no Qt).

- ``process``: the engine as a background process (JSON-lines progress, cancel kills the tree);
- ``engine``: the engine's command line (run, models) and what the model check reports;
- ``scene``: volume and label map nodes out to files (and back);
- ``results``: a finished run's outputs into the scene as result nodes;
- ``tables``: the coefficient, Dice and ranking tables of a run;
- ``cases``: a folder of cases and the results kept next to each case.
"""

try:
    from slicer.i18n import tr  # inside 3D Slicer: its translator, with this package's contexts
except ImportError:  # the slicer-core wheel (tests outside Slicer) has no translations

    def tr(text: str) -> str:
        return text
