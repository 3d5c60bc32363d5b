"""Pictures of volumes and segmentations, in radiological views with true proportions (matplotlib)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import nibabel.orientations as orientations  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .modelcard import Label  # noqa: E402
from .volume import Geometry  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis each view slices across
ENTROPY_COLORMAP = "magma"
ENTROPY_LABEL = "normalised entropy (0 certain, 1 uniform)"


@dataclass
class CanonicalVolume:
    """A 3D array reordered to RAS axes (x: left->right, y: posterior->anterior, z: inferior->superior).

    Attributes:
        array: (X, Y, Z) values on the reordered grid.
        spacing: voxel spacing in mm along x, y, z.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]

    def slice(self, view: str, index: int | None = None) -> tuple[np.ndarray, float]:
        """The 2D slice to show with ``imshow(origin="lower")``.

        Args:
            view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
            index: slice index along the view's RAS axis; None for the middle slice.

        Returns:
            (plane, aspect): the (rows, columns) image, and the pixel aspect ratio height/width
            (from the spacing in mm) for ``imshow(aspect=...)``.
        """
        axis = VIEW_AXES[view]
        index = self.array.shape[axis] // 2 if index is None else index
        # Flipping the first in-plane axis puts the patient's right (axial, coronal) and front
        # (sagittal) on the left of the screen, as radiology viewers and 3D Slicer show them.
        plane = np.take(self.array, index, axis=axis)[::-1, :]
        horizontal, vertical = [s for a, s in enumerate(self.spacing) if a != axis]
        return plane.T, vertical / horizontal


def canonical(array: np.ndarray, geometry: Geometry) -> CanonicalVolume:
    """Reorder and flip the voxel axes of an array to the closest RAS axes.

    Args:
        array: (I, J, K) values in the file's voxel order.
        geometry: the grid of ``array`` (its direction decides the reordering; oblique grids go to the
            nearest axes, without resampling).

    Returns:
        The ``CanonicalVolume`` with the spacing reordered alike.
    """
    order = orientations.io_orientation(geometry.affine_ras)  # row i: (RAS axis of voxel axis i, flip)
    spacing = [0.0] * 3
    for source, (target, _) in enumerate(order):
        spacing[int(target)] = float(geometry.spacing[source])
    return CanonicalVolume(orientations.apply_orientation(array, order), tuple(spacing))


def label_colormap(labels: tuple[Label, ...]) -> ListedColormap:
    """A colour map indexed by label value: background transparent, each label its colour at alpha 0.55."""
    colors = [(0, 0, 0, 0)] + [(*label.rgb, 0.55) for label in labels[1:]]
    return ListedColormap(colors)


def structure_slice(labels: CanonicalVolume, view: str = "axial") -> int:
    """The slice through the centre of the largest connected foreground structure.

    So the view opens on the anatomy: a slab of stray voxels at the volume's edge, which can hold the
    most foreground voxels of any slice, does not pull it there.

    Args:
        labels: a canonical (X, Y, Z) label map; any value > 0 is foreground.
        view: the view whose slice index is wanted.

    Returns:
        The slice index along the view's axis; the middle slice when there is no foreground.
    """
    from scipy import ndimage

    axis = VIEW_AXES[view]
    components, count = ndimage.label(labels.array > 0)
    if count == 0:
        return labels.array.shape[axis] // 2
    largest = int(np.argmax(np.bincount(components.reshape(-1))[1:])) + 1
    return int(round(float(np.argwhere(components == largest)[:, axis].mean())))


def most_different_slice(first: CanonicalVolume, second: CanonicalVolume, fallback: CanonicalVolume, view: str = "axial") -> int:
    """The slice where two label maps disagree on the most voxels.

    Args:
        first, second: canonical (X, Y, Z) label maps on the same grid.
        fallback: the label map whose ``structure_slice`` is taken when the two agree everywhere.
        view: the view whose slice index is wanted.

    Returns:
        The slice index along the view's axis.
    """
    axis = VIEW_AXES[view]
    counts = (first.array != second.array).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.any() else structure_slice(fallback, view)


def show_image(axes, image: CanonicalVolume, view: str, index: int, window: tuple[float, float], brightness: float = 1.0):
    """Draw one grey-value slice on matplotlib ``axes``, without ticks.

    Args:
        axes: the matplotlib axes to draw on.
        image: the canonical image.
        view, index: which slice (see ``CanonicalVolume.slice``).
        window: (low, high) intensities mapped to black and white (see ``intensity_window``).
        brightness: below 1 dims the slice, so that an overlay drawn on it stands out.
    """
    plane, aspect = image.slice(view, index)
    low, high = window
    axes.imshow(plane, cmap="gray", origin="lower", aspect=aspect, vmin=low, vmax=low + (high - low) / brightness,
                interpolation="bilinear")
    axes.set_xticks([])
    axes.set_yticks([])


def show_labels(axes, labels: CanonicalVolume, view: str, index: int, label_info: tuple[Label, ...]):
    """Overlay one slice of a canonical label map on ``axes`` in the labels' colours (background left out)."""
    plane, aspect = labels.slice(view, index)
    axes.imshow(np.ma.masked_equal(plane, 0), cmap=label_colormap(label_info), origin="lower", aspect=aspect,
                vmin=0, vmax=len(label_info) - 1, interpolation="nearest")


def intensity_window(array: np.ndarray) -> tuple[float, float]:
    """(low, high) display window: the 1st and 99th percentiles of about 200 000 evenly strided voxels
    (high > low even for a constant image)."""
    low, high = np.percentile(array[:: max(1, array.size // 200_000)], [1, 99])
    return float(low), float(high if high > low else low + 1)
