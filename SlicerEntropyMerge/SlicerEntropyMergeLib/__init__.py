"""MRML-side helpers of the SlicerEntropyMerge module (no Qt): scene bridge and engine process runner."""
