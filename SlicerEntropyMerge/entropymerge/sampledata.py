"""Seeded synthetic multi-site 3D scans with labels: the sample data, the training data and the benchmark.

Anatomy is defined in physical space (LPS mm) and drawn at random per case: a body with a fat
layer and a spine, a smoothly deformed organ with a small lesion inside it, a thin curved vessel,
and an unlabelled distractor organ. A *scanner* turns anatomy into a file: per-tissue intensities
(its contrast: T1-, T2-, CT-like ...), point-spread blur, slice thickness (anisotropic voxels with
partial-volume averaging across each slice), a multiplicative bias field, noise of its kind,
stored intensity scale and offset, field of view, and the orientation of the voxel axes in the
file. The generator knows scanners, not merging: sites differ only in how they image anatomy.

Labels: 0 background, 1 organ, 2 vessel, 3 lesion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import UserInputError
from .samplefiles import bundled_models, bundled_targets  # noqa: F401 (the sample assets' paths, re-exported)
from .settings import RankingSettings
from .volume import Geometry, Volume, write_volume

TISSUES = ("air", "body", "fat", "bone", "kidney", "organ", "vessel", "lesion")
LABEL_NAMES = ("background", "organ", "vessel", "lesion")
LABEL_COLORS = ("#000000", "#e69f00", "#d55e00", "#56b4e9")
TISSUE_LABEL = {"organ": 1, "vessel": 2, "lesion": 3}

AXIS_DIRECTIONS_LPS = {
    "L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1),
}


@dataclass(frozen=True)
class Scanner:
    """How one site turns anatomy into a stored volume."""

    name: str
    description: str
    contrast: dict  # mean intensity of each tissue, before the stored scale and offset
    spacing: tuple[float, float, float]  # mm along the file's i, j, k axes; k is the slice axis
    orientation: str  # where i, j, k point, e.g. "LPS", "RAS", "RSA" (coronal slices)
    fov_mm: tuple[float, float, float]
    psf_mm: float = 1.0  # in-plane Gaussian blur (sigma)
    bias: float = 0.0  # amplitude of the smooth multiplicative bias field (log scale)
    cupping: float = 0.0  # radial darkening towards the centre (cone-beam CT)
    noise: str = "gaussian"  # gaussian | rician | correlated
    noise_level: float = 0.02  # sigma relative to the contrast range
    contrast_jitter: float = 0.05  # per-case relative variation of each tissue's intensity
    scale: float = 1.0
    offset: float = 0.0
    dtype: str = "int16"


SOURCE_SITES = {
    "riverside-t1": Scanner(
        "riverside-t1", "1.5 T MR, T1-weighted, contrast-enhanced; axial slices, LPS storage",
        {"air": 0, "body": 400, "fat": 1000, "bone": 150, "kidney": 480, "organ": 620, "vessel": 900, "lesion": 280},
        spacing=(1.2, 1.2, 2.5), orientation="LPS", fov_mm=(156, 156, 130), psf_mm=1.0, bias=0.25,
        noise="rician", noise_level=0.03),
    "harbour-ct": Scanner(
        "harbour-ct", "CT, portal-venous phase (HU); axial slices, RAS storage",
        {"air": -1000, "body": 50, "fat": -100, "bone": 700, "kidney": 150, "organ": 115, "vessel": 200, "lesion": 45},
        spacing=(0.9, 0.9, 3.0), orientation="RAS", fov_mm=(160, 150, 132), psf_mm=0.8, noise="gaussian",
        noise_level=0.008, contrast_jitter=0.03),
    "valley-t2": Scanner(
        "valley-t2", "3 T MR, T2-weighted; thick axial slices, LAS storage",
        {"air": 0, "body": 280, "fat": 650, "bone": 120, "kidney": 820, "organ": 330, "vessel": 60, "lesion": 950},
        spacing=(1.0, 1.0, 4.0), orientation="LAS", fov_mm=(150, 150, 136), psf_mm=1.0, bias=0.35,
        noise="rician", noise_level=0.04),
    "summit-pd": Scanner(
        "summit-pd", "MR, proton-density-weighted; isotropic 1.5 mm, RAS storage",
        {"air": 0, "body": 500, "fat": 720, "bone": 250, "kidney": 600, "organ": 580, "vessel": 690, "lesion": 660},
        spacing=(1.5, 1.5, 1.5), orientation="RAS", fov_mm=(150, 150, 132), psf_mm=1.2, bias=0.2,
        noise="rician", noise_level=0.02),
}

TARGET_SITES = {
    "lowfield-t1": Scanner(
        "lowfield-t1", "0.55 T MR, T1-weighted, compressed contrast, heavy noise and bias; thick coronal slices (RSA)",
        {"air": 0, "body": 300, "fat": 700, "bone": 120, "kidney": 330, "organ": 420, "vessel": 560, "lesion": 240},
        spacing=(2.0, 2.0, 5.0), orientation="RSA", fov_mm=(150, 134, 150), psf_mm=1.8, bias=0.6,
        noise="rician", noise_level=0.08, scale=2.5),
    "cbct": Scanner(
        "cbct", "cone-beam CT: miscalibrated HU, cupping, blur and correlated noise; small field of view",
        {"air": -900, "body": 80, "fat": -40, "bone": 550, "kidney": 140, "organ": 150, "vessel": 230, "lesion": 85},
        spacing=(1.1, 1.1, 1.1), orientation="LPS", fov_mm=(128, 128, 110), psf_mm=1.6, cupping=0.25,
        noise="correlated", noise_level=0.03),
    "t2-fatsat": Scanner(
        "t2-fatsat", "MR, fat-suppressed T2; sagittal slices (PSR storage)",
        {"air": 0, "body": 250, "fat": 90, "bone": 80, "kidney": 700, "organ": 300, "vessel": 40, "lesion": 850},
        spacing=(0.9, 0.9, 3.5), orientation="PSR", fov_mm=(150, 132, 150), psf_mm=1.0, bias=0.4,
        noise="rician", noise_level=0.05),
}

# The public, pooled data the base model learns from: a generic MR protocol whose tissue
# intensities vary widely from case to case.
GENERIC_SITE = Scanner(
    "generic", "pooled public data: generic MR protocols, tissue intensities varying per case",
    {"air": 0, "body": 400, "fat": 700, "bone": 200, "kidney": 520, "organ": 560, "vessel": 700, "lesion": 350},
    spacing=(1.5, 1.5, 1.5), orientation="RAS", fov_mm=(150, 150, 132), psf_mm=1.0, bias=0.2,
    noise="gaussian", noise_level=0.03, contrast_jitter=0.35)

ALL_SITES = {**SOURCE_SITES, **TARGET_SITES, "generic": GENERIC_SITE}


def site(name: str) -> Scanner:
    """The scanner of a source, target or the generic site, by name (``UserInputError`` for an unknown one)."""
    if name not in ALL_SITES:
        raise UserInputError(f"unknown site {name!r}; known: {', '.join(ALL_SITES)}")
    return ALL_SITES[name]


# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclass
class Anatomy:
    """One random subject, in LPS millimetres around the body centre."""

    centre: np.ndarray
    body_radii: np.ndarray
    organ_centre: np.ndarray
    organ_radii: np.ndarray
    organ_rotation: np.ndarray
    lesion_centre: np.ndarray
    lesion_radii: np.ndarray
    kidney_centre: np.ndarray
    kidney_radii: np.ndarray
    spine_centre: np.ndarray
    vessel_points: np.ndarray
    vessel_radius: float
    modes: list = field(default_factory=list)  # smooth deformation: (amplitude, wave vector, phase)


def random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A 3x3 rotation about a random axis by an angle uniform in [-max_angle, max_angle] radians (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """One random subject: sizes and positions in LPS mm around a centre near the origin."""
    centre = rng.normal(0, 4, 3)
    body = np.array([rng.uniform(58, 68), rng.uniform(46, 54), rng.uniform(70, 80)])
    side = rng.choice([-1.0, 1.0])  # the organ on one side, the distractor on the other
    organ_radii = np.array([rng.uniform(24, 32), rng.uniform(19, 26), rng.uniform(22, 30)])
    organ_centre = centre + np.array([side * rng.uniform(14, 22), rng.uniform(-8, 4), rng.uniform(-10, 10)])
    rotation = random_rotation(rng, 0.5)
    lesion_offset = rotation @ (rng.uniform(-0.45, 0.45, 3) * organ_radii)
    lesion_radii = rng.uniform(4.5, 8.5) * np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)])
    kidney_centre = centre + np.array([-side * rng.uniform(22, 30), rng.uniform(8, 16), rng.uniform(-15, 5)])
    kidney_radii = np.array([rng.uniform(11, 14), rng.uniform(9, 12), rng.uniform(20, 26)])
    spine = centre + np.array([0.0, body[1] * 0.62, 0.0])
    # The vessel: a smooth curve from below to above the body that passes beside the organ.
    start = centre + np.array([rng.uniform(-12, 12), rng.uniform(-6, 10), -body[2] * 1.1])
    end = centre + np.array([rng.uniform(-12, 12), rng.uniform(-6, 10), body[2] * 1.1])
    near = organ_centre + np.array([-side * (organ_radii[0] + rng.uniform(4, 10)), rng.uniform(-8, 8), 0.0])
    bend = near + rng.normal(0, 8, 3)
    t = np.linspace(0, 1, 400)[:, None]
    curve = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * near + 3 * (1 - t) * t ** 2 * bend + t ** 3 * end
    modes = []
    for _ in range(4):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        modes.append((rng.normal(0, 3.5, 3), direction / rng.uniform(60, 140), rng.uniform(0, 2 * np.pi)))
    return Anatomy(centre, body, organ_centre, organ_radii, rotation, organ_centre + lesion_offset, lesion_radii,
                   kidney_centre, kidney_radii, spine, curve, float(rng.uniform(2.6, 4.2)), modes)


def tissue_map(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """The tissue at each physical point.

    Args:
        anatomy: the subject.
        points: (N, 3) positions in LPS mm.

    Returns:
        (N,) uint8 indices into ``TISSUES``.
    """
    warped = points.copy()
    for amplitude, wave, phase in anatomy.modes:
        warped += amplitude * np.sin(2 * np.pi * points @ wave + phase)[:, None]
    tissue = np.zeros(len(points), np.uint8)

    def ellipsoid(centre, radii, rotation=None):
        local = warped - centre
        if rotation is not None:
            local = local @ rotation
        return ((local / radii) ** 2).sum(axis=1)

    body = ellipsoid(anatomy.centre, anatomy.body_radii)
    tissue[body < 1.0] = TISSUES.index("fat")
    tissue[body < 0.80] = TISSUES.index("body")
    spine = ((warped[:, :2] - anatomy.spine_centre[:2]) ** 2).sum(axis=1) < 11.0 ** 2
    tissue[spine & (body < 0.9)] = TISSUES.index("bone")
    tissue[ellipsoid(anatomy.kidney_centre, anatomy.kidney_radii) < 1.0] = TISSUES.index("kidney")
    organ = ellipsoid(anatomy.organ_centre, anatomy.organ_radii, anatomy.organ_rotation) < 1.0
    tissue[organ] = TISSUES.index("organ")
    distance, _ = cKDTree(anatomy.vessel_points).query(warped, distance_upper_bound=anatomy.vessel_radius * 2)
    tissue[(distance < anatomy.vessel_radius) & (body < 0.95)] = TISSUES.index("vessel")
    lesion = ellipsoid(anatomy.lesion_centre, anatomy.lesion_radii, anatomy.organ_rotation) < 1.0
    tissue[lesion & organ] = TISSUES.index("lesion")
    return tissue


# ---------------------------------------------------------------------------------------------
# Scanner


def scan_geometry(scanner: Scanner, centre: np.ndarray, rng: np.random.Generator) -> Geometry:
    """The scanner's grid (its field of view, spacing and axis orientation) centred near ``centre`` (LPS mm)."""
    direction = np.array([AXIS_DIRECTIONS_LPS[c] for c in scanner.orientation], dtype=float).T
    shape = tuple(int(round(f / s)) for f, s in zip(scanner.fov_mm, scanner.spacing))
    grid_centre = centre + rng.normal(0, 5, 3)  # the patient is never exactly in the middle
    origin = grid_centre - direction @ (np.asarray(scanner.spacing) * (np.asarray(shape) - 1) / 2)
    return Geometry(shape, tuple(float(s) for s in scanner.spacing), tuple(float(o) for o in origin),
                    tuple(tuple(float(v) for v in row) for row in direction))


def simulate(scanner: Scanner, seed: int, anatomy_seed: int | None = None) -> tuple[Volume, Volume]:
    """One scan of one random subject.

    Args:
        scanner: how the site images anatomy.
        seed: seeds the scanner's randomness (and the anatomy, unless ``anatomy_seed`` is given).
        anatomy_seed: the subject's seed, to image one subject with several scanners.

    Returns:
        (image, labels) on the scanner's grid: the image in the scanner's stored type (int16 or
        float32), the labels uint8 (0 background, 1 organ, 2 vessel, 3 lesion), both (I, J, K).
    """
    rng = np.random.default_rng([seed, 7])
    anatomy = random_anatomy(np.random.default_rng([seed if anatomy_seed is None else anatomy_seed, 1]))
    geometry = scan_geometry(scanner, anatomy.centre, rng)
    shape = np.asarray(geometry.shape)
    subslices = 3 if scanner.spacing[2] > 1.6 else 1  # partial volume across thick slices
    offsets = (np.arange(subslices) - (subslices - 1) / 2) / subslices
    i, j, k = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), (np.arange(shape[2])[:, None] + offsets).ravel(), indexing="ij")
    voxels = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(np.float64)
    points = np.asarray(geometry.origin) + (voxels * geometry.spacing) @ np.asarray(geometry.direction).T
    tissues = tissue_map(anatomy, points).reshape(shape[0], shape[1], shape[2] * subslices)

    contrast = np.array([scanner.contrast[t] for t in TISSUES], dtype=np.float64)
    span = contrast.max() - contrast.min()
    contrast = contrast * (1 + rng.normal(0, scanner.contrast_jitter, len(TISSUES)))
    contrast[0] = scanner.contrast["air"]
    fine = contrast[tissues]
    sigma = [scanner.psf_mm / s for s in scanner.spacing[:2]] + [scanner.psf_mm * subslices / scanner.spacing[2]]
    fine = ndimage.gaussian_filter(fine, sigma)
    image = fine.reshape(shape[0], shape[1], shape[2], subslices).mean(axis=3)
    label_of_tissue = np.array([TISSUE_LABEL.get(t, 0) for t in TISSUES], np.uint8)
    labels = label_of_tissue[tissues[:, :, subslices // 2 :: subslices]]

    normalized = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    if scanner.bias:
        coefficients = rng.normal(0, 1, 9)
        terms = np.concatenate([normalized, normalized ** 2, normalized[[0, 1, 2]] * normalized[[1, 2, 0]]])
        field = np.tensordot(coefficients, terms, axes=1)
        image = image * np.exp(scanner.bias * field / np.abs(field).max())
    if scanner.cupping:
        radius = np.sqrt(normalized[0] ** 2 + normalized[1] ** 2)
        image = image - scanner.cupping * span * (1 - radius.clip(0, 1) ** 2) * (image > contrast.min() + 0.1 * span)
    sigma_noise = scanner.noise_level * span
    if scanner.noise == "rician":
        image = np.sqrt((image + rng.normal(0, sigma_noise, image.shape)) ** 2 + rng.normal(0, sigma_noise, image.shape) ** 2)
    elif scanner.noise == "correlated":
        noise = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), 1.2)
        image = image + sigma_noise * noise / noise.std()
    else:
        image = image + rng.normal(0, sigma_noise, image.shape)
    stored = scanner.scale * image + scanner.offset
    if scanner.dtype == "int16":
        stored = np.clip(np.round(stored), -32768, 32767).astype(np.int16)
    else:
        stored = stored.astype(np.float32)
    return Volume(stored, geometry), Volume(labels, geometry)


def write_case(scanner: Scanner, seed: int, folder: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Simulate a case and write ``<stem>_image.nii.gz`` and ``<stem>_labels.nii.gz`` into ``folder``.

    Args:
        scanner, seed: as ``simulate``.
        folder: made if needed.
        stem: the file names' stem; None for ``<scanner name>_<seed, 5 digits>``.

    Returns:
        (image path, labels path).
    """
    image, labels = simulate(scanner, seed)
    stem = stem or f"{scanner.name}_{seed:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    return (write_volume(image.array, image.geometry, folder / f"{stem}_image.nii.gz"),
            write_volume(labels.array, labels.geometry, folder / f"{stem}_labels.nii.gz"))


def describe_sites() -> str:
    """A plain-text table of every site: name, role (source, target, base) and description."""
    rows = [f"{'site':14} {'role':8} description"]
    for name, scanner in ALL_SITES.items():
        role = "source" if name in SOURCE_SITES else "target" if name in TARGET_SITES else "base"
        rows.append(f"{name:14} {role:8} {scanner.description}")
    return "\n".join(rows)


def simulate_scribbles(labels: Volume, seed: int, strokes: int = 3, length_mm: float = 12.0,
                      unlabelled: int = RankingSettings.unlabelled_value) -> Volume:
    """A few strokes per class, as an annotator would paint them on a reference label map.

    For every label present (background included), ``strokes`` seeds are drawn from the class's
    interior (the mask eroded by one voxel; background only within 15 mm of the structures); from
    each, a straight line of ``length_mm`` runs in a random direction within the seed's slice
    (constant k), keeping the voxels that stay inside the class. Everything else is ``unlabelled``.

    Args:
        labels: the (I, J, K) reference label map.
        seed: seeds the strokes.
        strokes: strokes per class.
        length_mm: the length of each stroke in mm.
        unlabelled: the value of voxels without a scribble.

    Returns:
        The scribbles as a uint8 ``Volume`` on the labels' grid.
    """
    rng = np.random.default_rng(seed)
    values = labels.array
    spacing = np.asarray(labels.geometry.spacing)
    near = ndimage.distance_transform_edt(values == 0, sampling=spacing) < 15.0
    scribbles = np.full(values.shape, unlabelled, np.uint8)
    for value in np.unique(values):
        mask = values == value
        interior = ndimage.binary_erosion(mask) if mask.sum() > 27 else mask
        if value == 0:
            interior &= near
        candidates = np.argwhere(interior if interior.any() else mask)
        for start in candidates[rng.choice(len(candidates), size=min(strokes, len(candidates)), replace=False)]:
            angle = rng.uniform(0, np.pi)
            direction = np.array([np.cos(angle), np.sin(angle), 0.0]) / np.append(spacing[:2], 1.0)
            steps = np.arange(-length_mm / 2, length_mm / 2, 0.5 * spacing[:2].min())
            points = np.round(start + steps[:, None] * direction).astype(int)
            points = points[np.all((points >= 0) & (points < values.shape), axis=1)]
            points = points[mask[tuple(points.T)]]
            scribbles[tuple(points.T)] = value
    return Volume(scribbles, labels.geometry)

