"""The Qt side of the SlicerEntropyMerge module, in parts the module file (``SlicerEntropyMerge.py``) uses.

- ``parameters``: the panel's choices (the parameter node and its enums) and the run request they make;
- ``sitemodels``: the site models section of the panel (listing, adding, checking them);
- ``views``: filling the panel's models table, result tables and slice views;
- ``logic``: Slicer's package helpers, to install what the engine needs;
- ``samples``: the bundled sample data, registered with the Sample Data module and loaded on request;
- ``selftest``: the module's self-test inside Slicer (sample data, Apply, checks).

What needs no Qt lives in ``SlicerEntropyMergeLib``; this package may import Qt and the Slicer application.
"""
