"""entropymerge: per-volume entropy-adaptive merging of site segmentation models (the engine of
the SlicerEntropyMerge 3D Slicer extension). It never imports Slicer, Qt or VTK."""

__version__ = "0.1.0"
