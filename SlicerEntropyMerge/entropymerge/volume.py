"""Reading and writing 3D volumes with their exact physical geometry.

Arrays are indexed (i, j, k) in the file's own voxel order. Geometry follows ITK: origin and
direction in LPS millimetres, direction columns are the i, j, k axis directions. ``affine_ras``
gives the 4x4 voxel-to-RAS matrix that NIfTI, nibabel, MONAI and 3D Slicer use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UserInputError
from .validation import inside_folder, physical_memory_bytes, regular_file

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# A volume file whose name ends so (before the suffix) is a label map beside the images of a case
# folder (the reference of the case it names), not a case itself.
LABEL_MAP_ENDINGS = ("_labels", "_label", "_seg", "_segmentation", "_mask")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume, as ITK describes it.

    Attributes:
        shape: voxels along i, j, k.
        spacing: voxel size in mm along i, j, k.
        origin: the centre of voxel (0, 0, 0) in LPS mm.
        direction: 3x3 rows of the LPS direction matrix; column n is the unit direction of voxel axis n.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    @classmethod
    def from_affine_ras(cls, affine_ras: np.ndarray, shape) -> "Geometry":
        """Geometry of a grid given its 4x4 voxel-to-RAS matrix (as MONAI and nibabel give it).

        Args:
            affine_ras: 4x4 voxel-index-to-RAS-mm matrix.
            shape: voxels along i, j, k.
        """
        affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
        linear = affine_lps[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        direction = linear / spacing
        return cls(
            shape=tuple(int(s) for s in shape),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in affine_lps[:3, 3]),
            direction=tuple(tuple(float(v) for v in row) for row in direction),
        )

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to LPS mm (ITK's convention)."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to RAS mm (NIfTI's, MONAI's and 3D Slicer's convention)."""
        return LPS_TO_RAS @ self.affine_lps

    @property
    def orientation(self) -> str:
        """Closest anatomical axis codes, e.g. ``"LPS"`` (where the i, j, k axes point)."""
        linear = self.affine_ras[:3, :3]
        codes = ""
        for column in linear.T:
            axis = int(np.argmax(np.abs(column)))
            codes += ("LR", "PA", "IS")[axis][int(column[axis] > 0)]
        return codes

    def matches(self, other: "Geometry", tolerance_mm: float = 1e-3) -> bool:
        """True when both grids have the same shape and put every corner (hence every voxel) within
        ``tolerance_mm`` millimetres of the same physical place."""
        if self.shape != other.shape:
            return False
        corners = np.array(
            [[i, j, k, 1.0] for i in (0, self.shape[0]) for j in (0, self.shape[1]) for k in (0, self.shape[2])]
        ).T
        return bool(np.abs(self.affine_lps @ corners - other.affine_lps @ corners).max() <= tolerance_mm)

    def describe(self) -> str:
        """One line for messages: shape, spacing (mm), origin (LPS mm) and the closest orientation codes."""
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:.2f}" for o in self.origin)
        return f"shape {self.shape}, spacing {spacing} mm, origin ({origin}) LPS, orientation {self.orientation}"


@dataclass
class Volume:
    """A 3D scalar volume: the (I, J, K) voxel array in the file's (i, j, k) order, its geometry, and the path it came from."""

    array: np.ndarray
    geometry: Geometry
    source: str | None = None


def split_volume_name(name: str) -> tuple[str, str] | None:
    """(stem, suffix) of a volume file name (``case1.nii.gz`` -> ``("case1", ".nii.gz")``), or None for other files."""
    suffix = next((s for s in FILE_SUFFIXES if name.lower().endswith(s)), None)
    return (name[: -len(suffix)], name[-len(suffix):]) if suffix else None


def is_label_map_name(name: str) -> bool:
    """True for a volume file named as a label map (``case1_labels.nii.gz``)."""
    parts = split_volume_name(name)
    return parts is not None and parts[0].lower().endswith(LABEL_MAP_ENDINGS)


def read_volume(path: str | os.PathLike, what: str = "volume") -> Volume:
    """Read a 3D scalar volume from NIfTI, NRRD, MHA/MHD, or a folder holding one DICOM series.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, or a folder with one DICOM series.
        what: how messages name the volume (e.g. ``"reference segmentation"``).

    Returns:
        The ``Volume``: the array in its stored type (native byte order) and the geometry in LPS mm;
        a 4D file with one time point counts as 3D.

    Raises:
        UserInputError: (naming ``what`` and the path) a missing, unreadable, truncated, non-3D,
            multi-component, too large for memory or non-finite volume, values beyond float32, a
            spacing that is not positive, or a detached data file outside the header's folder.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{what} not found: {path}")
    if path.is_dir():
        image = _read_dicom_series(path, what)
        return _validated_volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0), image, path, what)
    if not path.name.lower().endswith(FILE_SUFFIXES):
        raise UserInputError(
            f"{what} {path} has an unsupported file type; expected one of {', '.join(FILE_SUFFIXES)} "
            "or a folder with a DICOM series"
        )
    regular_file(path, what)
    detached_data_files(path, what)
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    try:
        header.ReadImageInformation()
    except RuntimeError as error:
        raise UserInputError(
            f"could not read {what} {path}: corrupt, truncated or {'not a NIfTI file' if nifti else 'of another format'} "
            f"({_itk_reason(error)})"
        ) from None
    _check_header(header, path, what)
    if nifti:
        # Geometry from ITK (as our writer uses it); voxels from nibabel, which refuses truncated files
        # and keeps NaN, where ITK's NIfTI reader zero-fills both silently.
        return _validated_volume(_read_nifti_voxels(path, what), header, path, what)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserInputError(
            f"could not read {what} {path} (corrupt, truncated or of another format): {_itk_reason(error)}"
        ) from None
    return _validated_volume(sitk.GetArrayFromImage(image).transpose(2, 1, 0), image, path, what)


def _check_header(header: sitk.ImageFileReader, path: Path, what: str) -> None:
    """Before any voxel is read: one component per voxel, and voxel data that fits in this computer's memory."""
    components = header.GetNumberOfComponents()
    if components != 1:
        raise UserInputError(f"{what} {path} has {components} components per voxel; a scalar volume is needed")
    voxels = float(np.prod([float(n) for n in header.GetSize()]))
    needed = voxels * 8  # read, then converted to float
    available = physical_memory_bytes()
    if needed > available:
        raise UserInputError(f"{what} {path} has {voxels:,.0f} voxels (size {header.GetSize()}), about {needed / 2**30:,.1f} GiB "
                             f"in memory; this computer has {available / 2**30:,.1f} GiB")


def detached_data_files(path: Path, what: str = "volume") -> list[Path]:
    """The data files a detached header (``.mhd``, ``.nhdr``) names; each must be a regular file in the header's folder.

    A header could otherwise make the tool read any file on the computer as voxels.

    Args:
        path: the volume file; other suffixes than ``.mhd`` and ``.nhdr`` give [].
        what: how messages name the volume.

    Returns:
        The data files the header names ([] for data inside the header, ``LOCAL``).

    Raises:
        UserInputError: a data file lists several files, is outside the header's folder or not a regular file.
    """
    separator = {".mhd": "=", ".nhdr": ":"}.get(path.suffix.lower())
    if separator is None:
        return []
    with open(path, "rb") as stream:
        header = stream.read(64 * 1024).decode("latin-1")
    files = []
    for line in header.splitlines():
        name, found, value = line.partition(separator)
        if found and name.strip().lower().replace(" ", "") in ("elementdatafile", "datafile"):
            value = value.strip()
            if value.upper() == "LOCAL":
                return []
            if value.upper().startswith("LIST") or "%" in value or " " in value:
                raise UserInputError(f"{what} {path} names its data as {value!r}; only one data file beside the header is supported")
            files.append(regular_file(inside_folder(path.parent / value, path.parent, f"{what} {path}: data file"), f"{what} data file"))
    return files


def _read_nifti_voxels(path: Path, what: str) -> np.ndarray:
    # Imported here, not at the top: 3D Slicer ships numpy and SimpleITK but not nibabel, and its
    # module lists the sample data and case files with this package before installing the rest.
    import nibabel

    try:
        image = nibabel.load(str(path))
        array = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        reason = " ".join(str(error).split()).replace(f" from {path}", "")
        raise UserInputError(f"{what} {path} is truncated or corrupt: {reason}") from None
    except Exception as error:  # nibabel raises many types for a damaged header
        raise UserInputError(f"could not read {what} {path}: not a valid NIfTI file ({error})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise UserInputError(f"{what} folder {folder} holds no DICOM series")
    if len(series_ids) > 1:
        listing = ", ".join(f"{sid} ({len(reader.GetGDCMSeriesFileNames(str(folder), sid))} files)" for sid in series_ids)
        raise UserInputError(
            f"{what} folder {folder} holds {len(series_ids)} DICOM series ({listing}); put one series per folder"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise UserInputError(f"could not read the DICOM series in {folder}: {_itk_reason(error)}") from None


def _validated_volume(array: np.ndarray, image, path: Path, what: str) -> Volume:
    """Check an (i, j, k) voxel array and the ITK image (or header) it came with; build the Volume."""
    size = tuple(image.GetSize())
    components = image.GetNumberOfComponentsPerPixel() if isinstance(image, sitk.Image) else image.GetNumberOfComponents()
    if components != 1:
        raise UserInputError(f"{what} {path} has {components} components per voxel; a scalar volume is needed")
    spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    if len(size) == 4 and size[3] == 1:  # one time point is a 3D volume
        spacing, origin = spacing[:3], origin[:3]
        direction = np.reshape(direction, (4, 4))[:3, :3].ravel()
        size = size[:3]
    if len(size) != 3:
        raise UserInputError(f"{what} {path} is {len(size)}D with size {size}; a 3D volume is needed")
    if min(size) < 2:
        raise UserInputError(f"{what} {path} has size {size}; a 3D volume needs at least 2 voxels per axis")
    if tuple(array.shape) != size:
        raise UserInputError(f"{what} {path} has voxel data of shape {array.shape} but a header of size {size}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise UserInputError(f"{what} {path} contains NaN or infinite voxel values")
    largest = float(np.abs(array).max()) if array.size and array.dtype.kind in "fiu" else 0.0
    if largest > float(np.finfo(np.float32).max):  # models compute in float32: these would become infinite
        raise UserInputError(f"{what} {path} holds values up to {largest:.3g}, beyond the float32 range (a wrong scaling in the header?)")
    geometry = Geometry(
        shape=size,
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(tuple(float(v) for v in row) for row in np.reshape(direction, (3, 3))),
    )
    if min(geometry.spacing) <= 0:
        raise UserInputError(f"{what} {path} has a non-positive voxel spacing {geometry.spacing}")
    return Volume(array=np.ascontiguousarray(array), geometry=geometry, source=str(path))


def _itk_reason(error: RuntimeError) -> str:
    """The informative line of an ITK exception (they span many lines of C++ context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ERROR" in line or "Description:" in line:
            return line.split("Description:")[-1].split("):", 1)[-1].split("ERROR:", 1)[-1].strip()
    return lines[-1] if lines else "unknown error"


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, verify: bool = False) -> Path:
    """Write an (i, j, k) array on ``geometry`` to ``path`` atomically (temporary name, then rename).

    The format follows the suffix of ``path``; NIfTI and NRRD files are compressed. ``verify``
    reads the file back before it is moved into place and raises ``OSError`` unless it holds the
    array: ITK's writer returns normally on a full disk.

    Args:
        array: (I, J, K) voxels; bool is written as uint8, other types as they are.
        geometry: the grid to write them on (its shape must be the array's).
        path: the destination (``.nii.gz``, ``.nrrd``, ``.mha``, ...).
        verify: read the file back before moving it into place.

    Returns:
        ``path``.

    Raises:
        ValueError: the array's shape is not the geometry's.
        OSError: writing failed, or (with ``verify``) the file does not hold the array.
    """
    path = Path(path)
    array = np.asarray(array)
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the geometry shape {geometry.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(o) for o in geometry.origin])
    image.SetDirection([float(d) for d in np.asarray(geometry.direction).ravel()])
    # Written under the final name inside a hidden folder (two-file formats such as .mhd name their
    # data file in the header), then moved into place.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        sitk.WriteImage(image, str(staging / path.name), useCompression=True)
        if verify:
            _verify_written(staging / path.name, array)
        for written in sorted(staging.iterdir(), key=lambda p: p.name == path.name):  # header last
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _verify_written(path: Path, array: np.ndarray) -> None:
    try:
        written = read_volume(path, "written file").array
    except UserInputError as error:
        raise OSError(f"the written file does not read back (disk full?): {error}") from None
    if written.shape != array.shape or not np.array_equal(written, array):
        raise OSError("the written file does not hold the data (disk full?)")


def read_label_map(path: str | os.PathLike, geometry: Geometry, what: str = "reference segmentation", allow_negative: bool = False) -> Volume:
    """Read an integer label map that must lie on ``geometry`` (the target volume's grid).

    Args:
        path: the label map file.
        geometry: the target volume's grid (matched within 1e-3 mm).
        what: how messages name the file.
        allow_negative: accept negative values (else refused).

    Returns:
        The ``Volume`` with an int64 array.

    Raises:
        UserInputError: as ``read_volume``, a different grid, non-integer values, or negative values.
    """
    volume = read_volume(path, what)
    if not volume.geometry.matches(geometry):
        raise UserInputError(
            f"{what} {path} is not on the target volume's grid: {what} has {volume.geometry.describe()}; "
            f"the volume has {geometry.describe()}"
        )
    values = volume.array
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise UserInputError(f"{what} {path} holds non-integer values; a label map is needed")
    if not allow_negative and values.size and values.min() < 0:
        raise UserInputError(f"{what} {path} holds negative values; a label map is needed")
    volume.array = values.astype(np.int64)
    return volume
