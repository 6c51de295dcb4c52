"""The built-in data set: synthetic short-axis cardiac cine MRI written in the ACDC layout.

No real data can be downloaded where this project is built, so every chapter and test trains on volumes
that this module draws from a small anatomical model and renders like a bSSFP cine acquisition.

Model, per patient (all lengths in millimetres; slice 0 is the base, the last slice the apex):

1. **Anatomy** (:func:`_draw_anatomy`). The left ventricle (LV) is a truncated prolate shape: the
   endocardial and epicardial radii shrink from the base to their apices, each cross-section a circle
   whose radius carries low-frequency Fourier perturbations (ellipticity, irregular boundaries) that
   change slowly from base to apex; the wall thickness varies around the ring. The right ventricle (RV)
   is an ellipse minus the LV, a crescent wrapping the septum, larger at the base, gone before the LV
   apex. Two papillary muscles and a trabeculated band sit inside the LV cavity (labelled LV, as in
   ACDC). The group (NOR, MINF, DCM, HCM, ARV, as in ACDC) sets the size, wall thickness, shape and
   contraction: DCM a large thin-walled weakly contracting LV, HCM a thick (septal) wall and small cavity,
   MINF a thinned akinetic segment, ARV an enlarged poorly contracting RV.
2. **End systole.** The base descends toward the fixed apex; the endocardium contracts by a factor set by
   the ejection fraction (not at all in an infarct); the epicardium follows so that the myocardial
   volume is conserved (the wall thickens).
3. **Surroundings.** Body outline with skin, subcutaneous fat, muscle and ribs; dark lungs with bright
   vessels; mediastinal and epicardial fat; the liver and upper abdomen rising into the apical slices;
   the spine, the descending aorta and the oesophagus posteriorly; atria and the aortic root above the
   base.
4. **Appearance.** Each tissue gets a bSSFP-like intensity (bright blood and fat, grey muscle and liver,
   dark lungs) with textures. Around the heart each slice is the weighted mean of three sub-slices
   across its thickness (through-plane partial volume); the image is blurred in-plane (the acquisition's
   resolution), multiplied by a smooth coil-sensitivity field, given Rician noise and scaled to whole
   scanner units. Each slice also carries its own small breath-hold shift of the heart.

The per-patient ejection fractions are drawn per group and met by calibration (:func:`_calibrate`).

Labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) are the exact anatomy at each slice's
centre, computed before the appearance model. Everything is drawn from ``np.random.default_rng([seed,
index, stream])``, so a patient depends only on its own index and the seed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from .nifti import DataError, write_volume

__all__ = ["GENERATOR_VERSION", "GROUPS", "SyntheticPatient", "synthesize_patient", "write_synthetic_acdc"]

# Raise whenever a change to this module changes the data it writes: folders written by an older
# version are then rewritten by ``kpssl.book.ensure_synthetic`` instead of being reused.
GENERATOR_VERSION = 1

GROUPS = ("NOR", "MINF", "DCM", "HCM", "ARV")
"""Groups as in ACDC; patient ``index`` (1-based) belongs to ``GROUPS[(index - 1) % 5]``."""

_README_MARK = "kpssl synthetic cardiac cine MRI"
_SUBSLICE_OFFSETS = np.array([-0.35, 0.0, 0.35], np.float32)  # fractions of the slice thickness
_SUBSLICE_WEIGHTS = np.array([0.25, 0.5, 0.25], np.float32)  # slice profile
_CENTRE = 1  # index of the sub-slice at the slice centre (labels are taken there)

# --- tissues and their appearance ----------------------------------------------------------------------
_TISSUES = (  # name, relative bSSFP intensity (LV blood = 1), texture amplitudes (coarse, medium, fine)
    ("air", 0.0, 0.0, 0.0, 0.0),
    ("skin", 0.45, 0.10, 0.05, 0.05),
    ("fat", 0.85, 0.06, 0.05, 0.04),
    ("muscle", 0.25, 0.12, 0.10, 0.06),
    ("bone", 0.40, 0.10, 0.15, 0.08),
    ("cortex", 0.08, 0.10, 0.10, 0.05),
    ("lung", 0.045, 0.35, 0.25, 0.25),
    ("mediastinum", 0.70, 0.12, 0.10, 0.05),
    ("epicardial_fat", 0.82, 0.06, 0.06, 0.05),
    ("pericardium", 0.15, 0.10, 0.05, 0.05),
    ("myocardium", 0.27, 0.05, 0.04, 0.04),
    ("lv_blood", 1.00, 0.04, 0.02, 0.02),
    ("rv_blood", 0.95, 0.05, 0.03, 0.02),
    ("rv_wall", 0.30, 0.05, 0.04, 0.04),
    ("trabecula", 0.38, 0.05, 0.05, 0.05),
    ("liver", 0.40, 0.06, 0.05, 0.04),
    ("stomach", 0.60, 0.25, 0.20, 0.06),
    ("spleen", 0.45, 0.06, 0.05, 0.04),
    ("vertebra", 0.45, 0.08, 0.12, 0.06),
    ("csf", 0.90, 0.03, 0.02, 0.02),
    ("cord", 0.35, 0.05, 0.03, 0.03),
    ("aorta", 0.92, 0.04, 0.02, 0.02),
    ("great_vessel", 0.95, 0.04, 0.02, 0.02),
    ("atrium", 0.93, 0.05, 0.03, 0.02),
    ("oesophagus", 0.30, 0.10, 0.05, 0.05),
    ("diaphragm", 0.25, 0.08, 0.05, 0.05),
)
_T = {name: number for number, (name, *_rest) in enumerate(_TISSUES)}
_BASE = np.array([t[1] for t in _TISSUES], np.float32)
_AMPLITUDE = np.array([t[2:] for t in _TISSUES], np.float32).T.copy()  # (3, tissues)
_VESSELS = np.zeros(len(_TISSUES), np.float32)  # brightness of vessel dots (lungs, liver)
_VESSELS[[_T["lung"], _T["liver"]]] = (0.35, 0.3)

# Per group, ranges of: LV cavity radius at the base (mm), wall thickness (mm), LV length (mm), LV and RV
# ejection fractions, base descent at ES (mm), RV crescent thickness and reach (fractions of the LV
# epicardial radius), RV apex (fraction of the LV length), profile exponent (larger: more spherical).
_COMMON = dict(rv_thick=(0.85, 1.2), rv_reach=(1.0, 1.2), rv_apex=(0.74, 0.86), power=(2.2, 2.8))
_GROUP_RANGES = {
    "NOR": dict(_COMMON, radius=(21, 26), wall=(7.0, 9.5), length=(80, 92), ef=(0.56, 0.68), rv_ef=(0.48, 0.60),
                descent=(4, 8)),
    "MINF": dict(_COMMON, radius=(25, 31), wall=(7.0, 9.0), length=(85, 98), ef=(0.25, 0.42),
                 rv_ef=(0.40, 0.55), descent=(2, 5)),
    "DCM": dict(_COMMON, radius=(30, 36), wall=(5.5, 7.0), length=(92, 106), ef=(0.12, 0.35), rv_ef=(0.30, 0.50),
                descent=(2, 4), rv_thick=(0.65, 0.9), power=(2.8, 3.6)),
    "HCM": dict(_COMMON, radius=(16, 21), wall=(11.0, 15.0), length=(75, 88), ef=(0.66, 0.80),
                rv_ef=(0.50, 0.65), descent=(4, 8), power=(2.0, 2.5)),
    "ARV": dict(_COMMON, radius=(20, 25), wall=(6.0, 8.5), length=(80, 92), ef=(0.50, 0.64), rv_ef=(0.20, 0.38),
                descent=(3, 7), rv_thick=(1.4, 1.8), rv_reach=(1.2, 1.4), rv_apex=(0.88, 0.96)),
}


@dataclass
class SyntheticPatient:
    """One synthetic patient: ED and ES volumes ``(Z, H, W)`` with labels and ACDC ``Info.cfg`` fields.

    Images are float32 holding whole scanner units (about 0 to 1000); labels are uint8 with 0 background,
    1 RV, 2 myocardium, 3 LV. ``spacing`` is ``(z, row, col)`` in mm. ``anatomy`` holds a few drawn
    parameters (radii, wall thickness, target ejection fractions, ...) for inspection.
    """

    patient_id: str
    group: str
    ed_frame: int
    es_frame: int
    nb_frame: int
    height: float
    weight: float
    spacing: tuple[float, float, float]
    ed_image: np.ndarray
    ed_label: np.ndarray
    es_image: np.ndarray
    es_label: np.ndarray
    anatomy: dict[str, float] = field(default_factory=dict)

    def info(self) -> dict[str, str]:
        """The ``Info.cfg`` fields, as ACDC writes them."""
        return {"ED": str(self.ed_frame), "ES": str(self.es_frame), "Group": self.group,
                "Height": f"{self.height:.1f}", "NbFrame": str(self.nb_frame), "Weight": f"{self.weight:.1f}"}

    def frames(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{frame number: (image, label)}`` for the ED and ES frames."""
        return {self.ed_frame: (self.ed_image, self.ed_label), self.es_frame: (self.es_image, self.es_label)}


@dataclass(frozen=True)
class _Anatomy:
    """Everything drawn for one patient; lengths in mm, angles in radians, image coordinates ``x`` to the
    right and ``y`` down from the image centre."""

    group: str
    pixel: float
    rows: int
    cols: int
    slices: int
    spacing_z: float
    thickness: float
    depth0: float  # depth of slice 0's centre below the ED base plane
    length: float  # depth of the epicardial apex (ED)
    endo_apex: float  # endocardial apex as a fraction of ``length``
    radius: float  # endocardial radius at the base (ED)
    wall: float  # wall thickness at the base (ED)
    power: float  # profile exponent
    endo_shape: np.ndarray  # (2, 2, 3): base/apex x cos/sin x harmonics 1..3, relative radius change
    wall_shape: np.ndarray  # (2, 2): cos/sin x harmonics 1..2, relative wall-thickness change
    septal_bump: float  # relative extra septal thickness (HCM)
    infarct: tuple[float, float, float, float]  # angle, half width, start (fraction of length), thinning
    contraction: float  # endocardial ES/ED radius ratio
    descent: float  # base descent at ES
    papillary: tuple[float, float, float]  # angles of the two muscles, radius (mm)
    gap_angle: float  # LV outflow (myocardium open at the base) and aortic root direction
    centre: tuple[float, float]  # LV centre at the base plane
    angle: float  # in-plane rotation of the heart
    drift: tuple[float, float]  # shift of the LV centre per mm of depth (heart frame)
    rv_thick: float
    rv_reach: float
    rv_offset: float  # RV ellipse centre toward the RV, fraction of the LV epicardial radius
    rv_shift: float  # RV ellipse centre along the anterior-posterior axis, same unit
    rv_tilt: float
    rv_apex: float
    rv_wall: float
    rv_shape: np.ndarray  # (2, 2): cos/sin x harmonics 2..3 of the angle around the LV
    rv_thick_es: float  # ES/ED factors of the RV crescent thickness and reach (see _calibrate)
    rv_reach_es: float
    lv_ef: float  # target ejection fractions
    rv_ef: float
    fat: tuple[float, float, float, float]  # epicardial fat over the LV, the RV, extra in the AV groove, apex
    body: tuple[float, float, float, float]  # centre x, y, semi-axes x, y
    body_shape: np.ndarray  # (2, 3): cos/sin x harmonics 2..4
    skin: float
    subcutaneous: float
    muscle: tuple[float, float, float]  # anterior, lateral, posterior thickness
    spine: tuple[float, float]  # vertebral body centre
    aorta_radius: float
    liver: tuple[float, float, float, float, float]  # dome centre x, top y at the base, semi-axes, rise per mm
    stomach: tuple[float, float, float, float]  # centre x, depth below the dome top, semi-axes
    gas: bool  # the stomach holds an air bubble
    ribs: int
    jitter: np.ndarray  # (slices, 2) breath-hold misregistration of the heart and liver per slice
    contrast: float  # myocardium intensity factor
    liver_contrast: float
    blur: float  # in-plane Gaussian sigma, pixels
    noise: float  # Rician sigma relative to blood
    bias: np.ndarray  # (6,) coil-sensitivity coefficients
    gain: float  # scanner units of LV blood


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _draw_anatomy(rng: np.random.Generator, group: str) -> _Anatomy:
    """Draw one patient's anatomy and acquisition from its group's ranges (see the module docstring)."""
    ranges = _GROUP_RANGES[group]
    pixel = round(_uniform(rng, (1.3, 1.7)), 3)
    rows = int(rng.integers(160, 201))
    cols = int(np.clip(rows + rng.integers(-12, 29), 160, 208))
    radius = _uniform(rng, ranges["radius"])
    wall = _uniform(rng, ranges["wall"])
    depth0 = _uniform(rng, (4.0, 9.0))
    spacing_z = 10.0 if rng.random() < 0.6 else round(_uniform(rng, (7.0, 10.0)) * 2) / 2
    length = _uniform(rng, ranges["length"])
    slices = int(np.clip(round((length - depth0) / spacing_z + 0.6), 8, 12))
    length = depth0 + (slices - 1 + _uniform(rng, (0.1, 0.6))) * spacing_z  # apex just past the last slice
    thickness = spacing_z if rng.random() < 0.7 else round(spacing_z - _uniform(rng, (0.0, 2.0)), 1)
    endo_apex = 1.0 - wall * _uniform(rng, (0.7, 1.0)) / length

    endo_shape = np.zeros((2, 2, 3), np.float32)
    endo_shape[:, :, 0] = rng.normal(0, 0.03, (2, 2))  # off-centre cavity
    endo_shape[:, :, 1] = rng.normal(0, 0.06, (2, 2))  # ellipticity
    endo_shape[:, :, 2] = rng.normal(0, 0.035, (2, 2))  # irregular
    wall_shape = rng.normal(0, 0.08, (2, 2)).astype(np.float32)
    septal_bump = _uniform(rng, (0.3, 0.7)) if group == "HCM" else 0.0
    if group == "MINF":
        infarct = (float(rng.choice([-1.9, -1.2, 1.6, 2.4]) + rng.normal(0, 0.25)), _uniform(rng, (0.5, 0.9)),
                   _uniform(rng, (0.15, 0.5)), _uniform(rng, (0.45, 0.65)))
    else:
        infarct = (0.0, 0.0, 2.0, 0.0)
    ef = _uniform(rng, ranges["ef"])
    descent = _uniform(rng, ranges["descent"])
    contraction = float(np.sqrt((1 - ef) * length / (length - descent)))  # ESV / EDV = k^2 (L - d) / L, refined
    rv_ef = _uniform(rng, ranges["rv_ef"])

    heart_x, heart_y = _uniform(rng, (-8, 22)), _uniform(rng, (-30, 0))
    body_ax, body_ay = _uniform(rng, (170, 215)), _uniform(rng, (125, 150))
    skin, subcutaneous = _uniform(rng, (1.5, 2.5)), _uniform(rng, (4, 16))
    muscle = (_uniform(rng, (14, 22)), _uniform(rng, (14, 24)), _uniform(rng, (40, 55)))
    rv_reach = _uniform(rng, ranges["rv_reach"])
    heart_top = (radius + wall) * (1.12 * rv_reach + 0.25) + 4.0  # the RV's anterior reach above the LV centre
    top = heart_y - heart_top - skin - subcutaneous - muscle[0] - _uniform(rng, (2, 15))  # the skin
    body_y = top + body_ay
    body_x = heart_x - _uniform(rng, (10, 30))
    spine_y = body_y + body_ay - skin - subcutaneous - muscle[2] + _uniform(rng, (2, 10))
    spine_x = body_x + float(rng.normal(0, 6))

    return _Anatomy(
        group=group, pixel=pixel, rows=rows, cols=cols, slices=slices, spacing_z=spacing_z, thickness=thickness,
        depth0=depth0, length=length, endo_apex=endo_apex, radius=radius, wall=wall,
        power=_uniform(rng, ranges["power"]), endo_shape=endo_shape, wall_shape=wall_shape,
        septal_bump=septal_bump, infarct=infarct, contraction=contraction, descent=descent,
        papillary=(-0.8 + float(rng.normal(0, 0.2)), 2.0 + float(rng.normal(0, 0.2)),
                   radius * _uniform(rng, (0.15, 0.22))),
        gap_angle=-2.3 + float(rng.normal(0, 0.15)),
        centre=(heart_x, heart_y), angle=float(np.deg2rad(rng.uniform(-25, 25))),
        drift=(_uniform(rng, (0.0, 0.18)), _uniform(rng, (-0.15, 0.05))),
        rv_thick=_uniform(rng, ranges["rv_thick"]), rv_reach=rv_reach,
        rv_offset=_uniform(rng, (0.45, 0.65)), rv_shift=_uniform(rng, (-0.2, 0.05)),
        rv_tilt=float(rng.normal(0, 0.2)), rv_apex=_uniform(rng, ranges["rv_apex"]),
        rv_wall=_uniform(rng, (2.5, 3.5)), rv_shape=rng.normal(0, 0.05, (2, 2)).astype(np.float32),
        rv_thick_es=1.0, rv_reach_es=1.0, lv_ef=ef, rv_ef=rv_ef,
        fat=(_uniform(rng, (0.0, 1.5)), _uniform(rng, (0.5, 3.5)), _uniform(rng, (3.0, 8.0)),
             _uniform(rng, (3.0, 9.0))),
        body=(body_x, body_y, body_ax, body_ay), body_shape=rng.normal(0, 0.02, (2, 3)).astype(np.float32),
        skin=skin, subcutaneous=subcutaneous, muscle=muscle,
        spine=(spine_x, spine_y), aorta_radius=_uniform(rng, (10, 13)),
        liver=(heart_x - _uniform(rng, (35, 60)), heart_y + _uniform(rng, (95, 125)), _uniform(rng, (100, 130)),
               _uniform(rng, (75, 95)), _uniform(rng, (1.0, 1.3))),
        stomach=(heart_x + _uniform(rng, (45, 75)), _uniform(rng, (25, 45)), _uniform(rng, (30, 45)),
                 _uniform(rng, (22, 32))),
        gas=bool(rng.random() < 0.5), ribs=int(rng.integers(7, 11)),
        jitter=rng.normal(0, 1.0, (slices, 2)).astype(np.float32),
        contrast=_uniform(rng, (0.85, 1.2)), liver_contrast=_uniform(rng, (0.85, 1.15)),
        blur=_uniform(rng, (0.7, 1.2)), noise=_uniform(rng, (0.02, 0.04)),
        bias=rng.normal(0, 1, 6).astype(np.float32), gain=_uniform(rng, (350, 900)),
    )


# --- geometry helpers (pure functions on arrays) -------------------------------------------------------
def _ellipse_sdf(x: np.ndarray, y: np.ndarray, ax: float | np.ndarray, ay: float | np.ndarray,
                 boundary: float | np.ndarray = 1.0) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the curve ``(x/ax)^2 + (y/ay)^2 = boundary^2``."""
    k0 = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    k1 = np.sqrt((x / (ax * ax)) ** 2 + (y / (ay * ay)) ** 2)
    return k0 * (k0 - boundary) / np.maximum(k1, 1e-6)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances: fills the grooves between shapes (width about ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _segment_sdf(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                 radius0: float | np.ndarray, radius1: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance to a tapered capsule: the segment ``p0``-``p1`` thickened by a radius
    going from ``radius0`` to ``radius1``."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - p0[0] - t * dx, y - p0[1] - t * dy) - (radius0 + (radius1 - radius0) * t)


def _harmonics(cos1: np.ndarray, sin1: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(cos k phi, sin k phi) for k = 1..count]`` from ``cos phi, sin phi`` by the angle-sum recursion."""
    out = [(cos1, sin1)]
    for _ in range(count - 1):
        c, s = out[-1]
        out.append((c * cos1 - s * sin1, s * cos1 + c * sin1))
    return out


def _fourier(harmonics: list[tuple[np.ndarray, np.ndarray]], coefficients: np.ndarray) -> np.ndarray:
    """``sum_k a_k cos k phi + b_k sin k phi``; ``coefficients (..., 2, K)`` broadcast against the angles."""
    total = 0.0
    for k, (c, s) in enumerate(harmonics):
        total = total + coefficients[..., 0, k] * c + coefficients[..., 1, k] * s
    return total


def _grid(anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm: ``x (1, 1, W)`` to the right, ``y (1, H, 1)`` down, 0 at the centre."""
    y = (np.arange(anatomy.rows, dtype=np.float32) - (anatomy.rows - 1) / 2) * anatomy.pixel
    x = (np.arange(anatomy.cols, dtype=np.float32) - (anatomy.cols - 1) / 2) * anatomy.pixel
    return x[None, None, :], y[None, :, None]


# --- the model ------------------------------------------------------------------------------------------
def _static_tissues(anatomy: _Anatomy, texture: np.ndarray, marbling: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Tissues that do not move with the heart, at each slice centre.

    Returns ``tissue (Z, H, W)`` (numbers of ``_TISSUES``) and the thoracic cavity mask ``(Z, H, W)``,
    where lungs, mediastinum, liver and heart go. ``texture`` and ``marbling (Z, H, W)`` (coarse and medium,
    unit variance) roughen the layers and put fat into the muscles.
    """
    a = anatomy
    x, y = _grid(a)
    depth = (a.depth0 + np.arange(a.slices, dtype=np.float32) * a.spacing_z)[:, None, None]  # (Z, 1, 1)
    bx, by, bax, bay = a.body
    rb = np.hypot((x[0] - bx) / bax, (y[0] - by) / bay) + 1e-6
    cos_b, sin_b = (x[0] - bx) / bax / rb, (y[0] - by) / bay / rb  # body angle, sin_b > 0 toward the back
    outline = 1 + _fourier(_harmonics(cos_b, sin_b, 4)[1:], a.body_shape) - 0.06 * np.clip(sin_b, 0, 1) ** 6
    body = _ellipse_sdf(x[0] - bx, y[0] - by, bax, bay, outline)  # (H, W), the same on every slice
    fat = a.subcutaneous * (1 + 0.3 * cos_b**2) * (1 + 0.15 * texture)  # (Z, H, W)
    muscle = a.muscle[0] * np.clip(-sin_b, 0, 1) ** 2 + a.muscle[1] * cos_b**2 + a.muscle[2] * np.clip(sin_b, 0, 1) ** 2
    tissue = np.full(texture.shape, _T["air"], np.uint8)
    tissue[:, body < 0] = _T["skin"]
    tissue[:, body < -a.skin] = _T["fat"]
    in_muscle = body < -a.skin - fat
    tissue[in_muscle] = _T["muscle"]
    tissue[in_muscle & (marbling > 2.5)] = _T["fat"]  # fat between and within the muscles
    cavity = body < -a.skin - fat - muscle

    # ribs and sternum: small bones in the inner chest wall, cut at different places on every slice
    xs, ys = x[0, 0], y[0, :, 0]
    for z in range(a.slices):
        angles = np.sort(rng.uniform(-np.pi + 0.3, -0.3, a.ribs)) + rng.normal(0, 0.05, a.ribs)
        for n, theta in enumerate(np.concatenate([[-np.pi / 2], angles])):
            normal = np.array([np.cos(theta) / bax, np.sin(theta) / bay])
            normal /= np.linalg.norm(normal)
            c2, s2 = np.cos(theta) ** 2, np.sin(theta) ** 2
            inward = a.skin + a.subcutaneous * (1 + 0.3 * c2) + 0.7 * (a.muscle[0] * s2 + a.muscle[1] * c2)
            cx = bx + bax * np.cos(theta) - inward * normal[0]
            cy = by + bay * np.sin(theta) - inward * normal[1]
            half = (12.0, 4.5) if n == 0 else (rng.uniform(5, 9), rng.uniform(3.5, 5.5))
            cols = slice(*np.searchsorted(xs, [cx - 14, cx + 14]))  # a small window around the bone
            rows = slice(*np.searchsorted(ys, [cy - 14, cy + 14]))
            tx, ty = normal[1], -normal[0]  # the bone's long axis follows the chest wall
            px, py = xs[cols][None, :] - cx, ys[rows][:, None] - cy
            d = _ellipse_sdf(px * tx + py * ty, -px * ty + py * tx, half[0], half[1])
            window = tissue[z, rows, cols]  # a view
            window[d < 0] = _T["cortex"]
            window[d < -1.2] = _T["bone"]

    # spine, spinal canal, descending aorta, oesophagus (posterior, drifting a little with depth)
    sx, sy = a.spine
    sy_z = sy + 0.15 * depth
    vertebra = _ellipse_sdf(x - sx, y - sy_z, 21.0, 16.0)
    tissue[vertebra < 0] = _T["cortex"]
    tissue[vertebra < -1.5] = _T["vertebra"]
    canal = np.hypot(x - sx, y - sy_z - 27.0)
    tissue[canal < 8.5] = _T["csf"]
    tissue[canal < 4.5] = _T["cord"]
    aorta = np.hypot(x - sx - 24.0, y - sy_z + 24.0)
    tissue[aorta < a.aorta_radius + 1.5] = _T["cortex"]
    tissue[aorta < a.aorta_radius] = _T["aorta"]
    oesophagus = np.hypot(x - sx + 4.0, y - sy_z + 30.0)
    tissue[(oesophagus < 7.0) & (aorta > a.aorta_radius + 1.5)] = _T["oesophagus"]
    cavity &= (vertebra > 0) & (aorta > a.aorta_radius + 1.5) & (oesophagus > 7.0)
    return tissue, cavity


def _heart_box(anatomy: _Anatomy, s: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of a box that holds the heart, its fat and the aortic root on the sub-slices at
    anatomical levels ``s`` with LV centres ``cx, cy`` (bounds of the shapes drawn by :func:`_heart`)."""
    a = anatomy
    sc = float(np.clip(np.min(s), 0.0, 1.0))
    endo = a.radius * np.sqrt(max(1 - (sc / a.endo_apex) ** a.power, 0.0))
    epi = (a.radius + a.wall) * np.sqrt(max(1 - sc**a.power, 0.0))
    epi_bound = 1.25 * endo + 1.35 * (1 + a.septal_bump) * max(epi - endo, 0.0) + 1.0
    rv_bound = epi * (1 + 1.25 * a.rv_thick * 1.15) + a.rv_wall if sc < a.rv_apex else 0.0
    root_bound = 0.8 * (a.radius + a.wall) + 14.5 if np.min(s) < 0.06 else 0.0
    fat_lv, fat_rv, fat_groove, fat_apex = a.fat
    extent = max(epi_bound, rv_bound, root_bound) + 2.0 * (max(fat_lv, fat_rv) + fat_apex) + fat_groove + 4.0
    col0 = int(np.floor((np.min(cx) - extent) / a.pixel + (a.cols - 1) / 2))
    col1 = int(np.ceil((np.max(cx) + extent) / a.pixel + (a.cols - 1) / 2)) + 1
    row0 = int(np.floor((np.min(cy) - extent) / a.pixel + (a.rows - 1) / 2))
    row1 = int(np.ceil((np.max(cy) + extent) / a.pixel + (a.rows - 1) / 2)) + 1
    return slice(max(row0, 0), min(row1, a.rows)), slice(max(col0, 0), min(col1, a.cols))


def _heart(anatomy: _Anatomy, phase: str, x: np.ndarray, y: np.ndarray, s: np.ndarray, cx: np.ndarray,
           cy: np.ndarray, rough: np.ndarray | None = None, coarse: np.ndarray | None = None
           ) -> dict[str, np.ndarray]:
    """Masks of the heart's parts on sub-slices at anatomical levels ``s (N, 1, 1)`` (0 base plane,
    1 epicardial apex), LV centres ``cx, cy (N, 1, 1)``, pixel coordinates ``x (1, 1, w)``, ``y (1, h, 1)``.

    ``rough`` and ``coarse (N, h, w)`` (unit variance) shape trabeculations and fat. Returns boolean masks
    ``(N, h, w)`` and the signed distance ``fat`` (negative in epicardial fat or heart); without ``rough``
    only the ventricles (``lv_cavity``, ``myocardium``, ``rv_cavity``).
    """
    a = anatomy
    sc = np.clip(s, 0.0, 1.0)
    if phase == "ED":
        stretch, k0 = 1.0, 1.0
    else:
        stretch, k0 = a.length / (a.length - a.descent), a.contraction  # shortened: slices hold more tissue

    # heart frame: u toward the lateral wall (RV at -u), v toward the inferior wall (anterior at -v)
    ca, sa = float(np.cos(a.angle)), float(np.sin(a.angle))
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    r = np.hypot(u, v) + 1e-6
    harmonics = _harmonics(u / r, v / r, 3)
    cos1, sin1 = harmonics[0]

    # LV radii (ED) at this level, then the angular shape of the endocardium and of the wall
    endo_mean = a.radius * np.sqrt(np.clip(1 - (sc / a.endo_apex) ** a.power, 0, 1))
    epi_mean = (a.radius + a.wall) * np.sqrt(np.clip(1 - sc**a.power, 0, 1))
    coefficients = a.endo_shape[0] * (1 - sc[..., None, None]) + a.endo_shape[1] * sc[..., None, None]
    endo = endo_mean * (1 + _fourier(harmonics, coefficients))  # coefficients (N, 1, 1, 2, 3)
    thickness = (epi_mean - endo_mean) * (1 + _fourier(harmonics[:2], a.wall_shape))
    if a.septal_bump:
        thickness = thickness * (1 + a.septal_bump * np.exp(3.0 * (-cos1 - 1)))  # septum at phi = pi
    angle_i, half_i, start_i, thin_i = a.infarct
    infarct = 0.0
    if thin_i:
        infarct = np.clip((cos1 * np.cos(angle_i) + sin1 * np.sin(angle_i) - np.cos(half_i)) * 8, 0, 1)
        infarct = infarct * np.clip((sc - start_i) * 10, 0, 1)
        thickness = thickness * (1 - thin_i * infarct)
    epi = endo + thickness
    if phase == "ES":  # contract, except the akinetic infarct, keeping the myocardial volume
        endo_es = endo * (k0 + (1 - k0) * infarct)
        epi = np.sqrt(endo_es**2 + (epi**2 - endo**2) * stretch)
        endo = endo_es
        epi_mean = np.sqrt((endo_mean * k0) ** 2 + (epi_mean**2 - endo_mean**2) * stretch)
        endo_mean = endo_mean * k0
    epi_sdf = r - epi
    lv_cavity = r < endo
    myocardium = (r < epi) & ~lv_cavity

    # LV outflow: at the very base the ring opens toward the aortic root
    gap_open = np.clip((0.05 - s) / 0.05, 0, 1) * 0.45  # half-angle of the opening (radians)
    if np.any(gap_open > 0):
        toward_gap = cos1 * np.cos(a.gap_angle) + sin1 * np.sin(a.gap_angle)
        outflow = myocardium & (toward_gap > np.cos(gap_open)) & (gap_open > 0)
    else:
        outflow = np.zeros_like(myocardium)

    # RV: an ellipse around the septal side minus the LV, shrinking toward its own apex
    g = np.sqrt(np.clip(1 - (sc / a.rv_apex) ** 2, 0, 1)) * (1 + 0.12 * np.clip(1 - sc / a.rv_apex, 0, 1))
    rv_thick = a.rv_thick * (a.rv_thick_es if phase == "ES" else 1.0)
    rv_reach = a.rv_reach * (a.rv_reach_es if phase == "ES" else 1.0)
    axis_u = np.maximum(epi_mean * (1 - a.rv_offset + rv_thick * g), 1e-3)
    axis_v = np.maximum(epi_mean * ((1 - a.rv_offset) + (rv_reach - (1 - a.rv_offset)) * g), 1e-3)
    pu, pv = u + a.rv_offset * epi_mean, v - a.rv_shift * epi_mean * g
    ct, st = float(np.cos(a.rv_tilt)), float(np.sin(a.rv_tilt))
    pu, pv = pu * ct + pv * st, -pu * st + pv * ct
    rv_sdf = _ellipse_sdf(pu, pv, axis_u, axis_v, 1 + _fourier(harmonics[1:], a.rv_shape) * g)  # LV angles
    rv_sdf = np.where(g > 0, rv_sdf, np.float32(1e3))
    outside_lv = epi_sdf > 0
    rv_cavity = (rv_sdf < 0) & outside_lv
    if rough is None:
        return dict(lv_cavity=lv_cavity, myocardium=myocardium, outflow=outflow, rv_cavity=rv_cavity)
    rv_wall = (rv_sdf < a.rv_wall) & outside_lv & ~rv_cavity

    # papillary muscles and trabeculations inside the LV cavity (labelled LV), trabeculations in the RV
    size = a.papillary[2] * np.clip(np.sin(np.pi * np.clip((sc - 0.15) / 0.65, 0, 1)) * 1.6, 0, 1)
    size = size * np.sqrt(stretch)
    papillary = np.zeros(lv_cavity.shape, bool)
    for angle in a.papillary[:2] if np.any(size > 0) else ():
        at = endo_mean - 0.9 * size if phase == "ES" else 0.6 * endo_mean
        papillary |= np.hypot(u - at * np.cos(angle), v - at * np.sin(angle)) < size
    band = 3.0 if phase == "ED" else 2.0
    trabecula = lv_cavity & (r > endo - band) & (rough > 0.7)
    rv_trabecula = rv_cavity & (rv_sdf > -band) & (rough > 0.9)

    # epicardial fat: thin over the LV, thicker over the RV, in the grooves and the AV groove
    rv_outer = np.where(g > 0, rv_sdf - a.rv_wall, np.float32(1e3))
    heart_sdf = _smooth_min(epi_sdf, rv_outer, 10.0)
    near_rv = np.clip(0.5 + (epi_sdf - rv_outer) / 10.0, 0, 1)
    fat_lv, fat_rv, fat_groove, fat_apex = a.fat
    fat_thick = (fat_lv + (fat_rv - fat_lv) * near_rv + fat_apex * sc**3) * (1 + 0.4 * np.clip(coarse, -2, 2.5)) \
        + fat_groove * np.exp(-np.abs(s) * 12)
    fat_sdf = heart_sdf - np.maximum(fat_thick, 0.0)

    # aortic root at and above the base, anteroseptal, between the LV outflow and the RV
    root_radius = 13.0 * np.clip((0.06 - s) / 0.03, 0, 1)
    at = 0.8 * (a.radius + a.wall)
    if np.any(root_radius > 0):
        root = np.hypot(u - at * np.cos(a.gap_angle), v - at * np.sin(a.gap_angle)) - root_radius
    else:
        root = np.full(1, np.float32(1e3))
    present = (s < 1.0) & (s > -0.25)
    return dict(lv_cavity=lv_cavity, myocardium=myocardium, outflow=outflow, rv_cavity=rv_cavity,
                rv_wall=rv_wall, papillary=papillary & lv_cavity, trabecula=trabecula, rv_trabecula=rv_trabecula,
                atrial_wall=myocardium & (r < endo + 2.0), fat=np.where(present, fat_sdf, np.float32(1e3)),
                pericardium=present & (np.abs(fat_sdf + 0.5 * fat_thick) < 0.6) & (fat_thick > 3.5),
                root=(root < 0) & (root_radius > 0), root_wall=(root < 1.5) & (root_radius > 0))


def _stack_area(anatomy: _Anatomy, phase: str, cavity: str) -> float:
    """Area of the ``"lv"`` or ``"rv"`` cavity (as labelled) summed over the slice centres, on a coarse grid."""
    a = anatomy
    depth = (a.depth0 + np.arange(a.slices) * a.spacing_z).astype(np.float32)[:, None, None]  # (Z, 1, 1)
    s = depth / a.length if phase == "ED" else (depth - a.descent) / (a.length - a.descent)
    if cavity == "lv":
        grid = np.arange(-1.2 * a.radius - 2.0, 1.2 * a.radius + 2.0, 1.5, dtype=np.float32)
    else:
        extent = (a.radius + a.wall) * (1.3 + 1.5 * a.rv_thick) + 10.0
        grid = np.arange(-extent, extent, 2.5, dtype=np.float32)
    centre = np.zeros_like(depth)
    parts = _heart(a, phase, grid[None, None, :], grid[None, :, None], s, centre, centre)
    inside = parts["lv_cavity"] | parts["outflow"] if cavity == "lv" else parts["rv_cavity"]
    return float((inside & (s >= 0)).sum() * (grid[1] - grid[0]) ** 2)  # no labels above the base plane


def _calibrate(anatomy: _Anatomy) -> _Anatomy:
    """Set the ES contraction of the LV (endocardial radius factor) and then of the RV (free wall inward,
    horns shorter) so that the labelled ejection fractions of the stack meet their targets."""

    def bisect(make, cavity: str, target: float, low: float) -> _Anatomy:
        ed_area, high = _stack_area(anatomy, "ED", cavity), 1.0
        for _ in range(7):  # the ES area grows with the factor
            factor = (low + high) / 2
            if _stack_area(make(factor), "ES", cavity) > (1 - target) * ed_area:
                high = factor
            else:
                low = factor
        return make((low + high) / 2)

    anatomy = bisect(lambda k: dataclasses.replace(anatomy, contraction=k), "lv", anatomy.lv_ef, 0.2)
    return bisect(lambda k: dataclasses.replace(anatomy, rv_thick_es=k, rv_reach_es=k**0.4), "rv", anatomy.rv_ef,
                  0.1)


@dataclass
class _Scene:
    """One phase painted: tissues at the slice centres ``(Z, H, W)``, and per slice the heart's box with its
    S sub-slices ``(S, h, w)`` (outside the box the sub-slices equal the centre), and the labels."""

    tissue: np.ndarray
    boxes: list[tuple[slice, slice, np.ndarray]]
    label: np.ndarray


def _paint(tissue: np.ndarray, mask: np.ndarray, value: int | np.ndarray) -> None:
    """``tissue[mask] = value`` with ``value`` broadcast against ``mask`` (a number or an array)."""
    np.copyto(tissue, np.asarray(value, np.uint8), where=mask)


def _moving_tissues(anatomy: _Anatomy, phase: str, static: np.ndarray, cavity: np.ndarray,
                    textures: np.ndarray) -> _Scene:
    """Paint lungs, upper abdomen, mediastinum and heart for one phase (``"ED"`` or ``"ES"``).

    The heart changes within a slice's thickness, so it is painted on S sub-slices (through-plane
    partial volume) inside a box per slice; the rest is painted at the slice centre. ``static`` and
    ``cavity`` come from :func:`_static_tissues`, ``textures (3, Z, H, W)`` roughen the boundaries.
    """
    a = anatomy
    S = len(_SUBSLICE_OFFSETS)
    x, y = _grid(a)
    centre_depth = (a.depth0 + np.arange(a.slices) * a.spacing_z).astype(np.float32)[:, None, None]  # (Z, 1, 1)
    depth = centre_depth[:, None] + (_SUBSLICE_OFFSETS * a.thickness)[None, :, None, None]  # (Z, S, 1, 1)

    # anatomical level: 0 at the base plane, 1 at the epicardial apex; the base descends at ES
    s = depth / a.length if phase == "ED" else (depth - a.descent) / (a.length - a.descent)
    jitter = a.jitter[:, :, None, None, None]  # (Z, 2, 1, 1, 1)
    ca, sa = float(np.cos(a.angle)), float(np.sin(a.angle))
    cx = a.centre[0] + jitter[:, 0] + depth * (a.drift[0] * ca - a.drift[1] * sa)  # (Z, S, 1, 1)
    cy = a.centre[1] + jitter[:, 1] + depth * (a.drift[0] * sa + a.drift[1] * ca)

    # lungs fill the cavity; the upper abdomen (liver, stomach, spleen) rises into the apical slices
    tissue = static.copy()
    coarse, medium = textures[0], textures[1]
    lx, ly, lax, lay, rise = a.liver
    dome_top = ly - rise * centre_depth + a.jitter[:, 1, None, None]  # (Z, 1, 1)
    dome = _ellipse_sdf(x - lx, y - dome_top - lay, lax, lay) + 4.0 * coarse
    abdomen = cavity & (dome < 0)
    gx, gy, gax, gay = a.stomach
    stomach = _ellipse_sdf(x - gx, y - dome_top - gy, gax, gay) + 3.0 * coarse
    spleen = x - gx - 0.4 * gax + 10.0 * coarse
    _paint(tissue, cavity, _T["lung"])
    _paint(tissue, cavity & (dome < 4.0), _T["diaphragm"])
    _paint(tissue, abdomen, np.where(spleen > 0, _T["spleen"], _T["liver"]))
    _paint(tissue, abdomen & (stomach < 2.5), _T["diaphragm"])
    _paint(tissue, abdomen & (stomach < 0), _T["stomach"])
    if a.gas:
        _paint(tissue, abdomen & (stomach < 0) & (y < dome_top + gy - 0.45 * gay), _T["air"])
    # anterior mediastinum: fat between the heart and the chest wall, narrower toward the apex
    top = a.body[1] - a.body[3] + a.skin + a.subcutaneous + a.muscle[0]
    level = np.clip(s[:, _CENTRE], 0, 1)  # (Z, 1, 1)
    wall_point = (a.centre[0] - 15.0, top + 5.0)
    width = 30.0 * np.clip(1 - level / 0.6, 0, 1)  # (Z, 1, 1)
    anterior = _segment_sdf(x, y, (cx[:, _CENTRE], cy[:, _CENTRE]), wall_point, width / 3, width + 8.0 * coarse)
    anterior = np.where(width > 8.0, anterior, np.float32(1e3))
    _paint(tissue, cavity & (anterior < 0) & ~abdomen, _T["mediastinum"])

    boxes, label = [], np.zeros((a.slices, a.rows, a.cols), np.uint8)
    for z in range(a.slices):  # one box per slice: the heart shrinks toward the apex
        rows, cols = _heart_box(a, s[z], cx[z], cy[z])
        window = (z, rows, cols)
        parts = _heart(a, phase, x[:, :, cols], y[:, rows], s[z], cx[z], cy[z], medium[window][None],
                       coarse[window][None])
        sub = np.repeat(tissue[window][None], S, axis=0)  # (S, h, w)
        inside = cavity[window][None]
        above = s[z] < 0  # (S, 1, 1) above the base plane: atria, no ventricles
        ventricle = ~above
        mediastinum = _smooth_min(parts["fat"], anterior[window][None], 12.0)
        _paint(sub, inside & (mediastinum < 0) & ~abdomen[window][None], _T["mediastinum"])
        _paint(sub, inside & (parts["fat"] < 0), _T["epicardial_fat"])
        _paint(sub, inside & parts["pericardium"], _T["pericardium"])
        _paint(sub, parts["root_wall"] & ventricle, _T["cortex"])  # behind the ventricles at the base
        _paint(sub, parts["root"] & ventricle, _T["great_vessel"])
        _paint(sub, parts["rv_wall"], _T["rv_wall"])
        _paint(sub, parts["rv_cavity"], np.where(above, _T["atrium"], _T["rv_blood"]))
        _paint(sub, parts["rv_trabecula"] & ventricle, _T["trabecula"])
        atrial = np.where(above & ~parts["atrial_wall"], _T["epicardial_fat"], _T["myocardium"])
        _paint(sub, parts["myocardium"], atrial)
        lv = parts["lv_cavity"] | parts["outflow"]
        _paint(sub, lv, np.where(above, _T["atrium"], _T["lv_blood"]))
        _paint(sub, parts["trabecula"] & ventricle, _T["trabecula"])
        _paint(sub, parts["papillary"] & ventricle, _T["myocardium"])
        _paint(sub, parts["root_wall"] & above, _T["cortex"])  # in front of the atria above the base
        _paint(sub, parts["root"] & above, _T["great_vessel"])
        tissue[window] = sub[_CENTRE]
        boxes.append((rows, cols, sub))

        # labels at the slice centre, ventricles only below the base plane
        if ventricle[_CENTRE, 0, 0]:
            view = label[window]
            view[parts["rv_cavity"][_CENTRE]] = 1
            view[parts["myocardium"][_CENTRE] & ~parts["outflow"][_CENTRE]] = 2
            view[lv[_CENTRE]] = 3
    return _Scene(tissue, boxes, label)


def _upsample(field: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear enlargement of ``field (Z, h, w)`` to ``(Z, rows, cols)``, one axis at a time."""
    for axis, size in ((1, rows), (2, cols)):
        position = np.linspace(0, field.shape[axis] - 1, size, dtype=np.float32)
        low = np.minimum(position.astype(int), field.shape[axis] - 2)
        frac = position - low
        shape = [1, 1, 1]
        shape[axis] = size
        frac = frac.reshape(shape)
        field = np.take(field, low, axis=axis) * (1 - frac) + np.take(field, low + 1, axis=axis) * frac
    return field


def _textures(anatomy: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice textures ``(3, Z, H, W)`` (coarse, medium, fine; unit variance) and vessel dots ``(Z, H, W)``."""
    shape = (anatomy.slices, anatomy.rows, anatomy.cols)
    small = (shape[0], shape[1] // 4 + 2, shape[2] // 4 + 2)  # the coarse field: smooth at 1/4 size, enlarge
    coarse = gaussian_filter(rng.standard_normal(small, dtype=np.float32), (0, 2.0, 2.0), mode="wrap")
    fields = [_upsample(coarse, shape[1], shape[2])]
    for sigma in (2.0, 0.8):
        fields.append(gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0, sigma, sigma), mode="wrap"))
    fields = [(f / (f.std() + 1e-6)).astype(np.float32) for f in fields]
    dots = (rng.random(shape, dtype=np.float32) < 0.003) * rng.uniform(0.3, 1.0, shape).astype(np.float32)
    dots = gaussian_filter(dots, (0, 0.9, 0.9))
    return np.stack(fields), np.clip(dots * 5.0, 0, 1)


def _intensity(tissue: np.ndarray, base: np.ndarray, textures: np.ndarray, dots: np.ndarray) -> np.ndarray:
    """Noise-free intensity of ``tissue (..., h, w)`` with per-tissue ``base`` values, textures ``(3, h, w)``
    and vessel dots ``(h, w)`` (bright in the lungs and the liver)."""
    texture = 1 + _AMPLITUDE[0][tissue] * textures[0] + _AMPLITUDE[1][tissue] * textures[1] \
        + _AMPLITUDE[2][tissue] * textures[2]
    vessels = _VESSELS[tissue] * dots
    return np.maximum(base[tissue] * texture + vessels, 0)


def _render(anatomy: _Anatomy, scene: _Scene, textures: np.ndarray, dots: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """bSSFP-like image ``(Z, H, W)`` in whole scanner units."""
    a = anatomy
    base = _BASE.copy()
    base[[_T["myocardium"], _T["rv_wall"], _T["trabecula"], _T["diaphragm"]]] *= a.contrast
    base[_T["liver"]] *= a.liver_contrast
    image = np.empty(scene.tissue.shape, np.float32)
    for z, (rows, cols, sub) in enumerate(scene.boxes):
        image[z] = _intensity(scene.tissue[z], base, textures[:, z], dots[z])
        window = _intensity(sub, base, textures[:, z, rows, cols], dots[z, rows, cols])  # (S, h, w)
        image[z, rows, cols] = np.tensordot(_SUBSLICE_WEIGHTS, window, axes=(0, 0))  # through-plane partial volume
    image = gaussian_filter(image, (0, a.blur, a.blur))  # in-plane resolution

    # coil sensitivity: smooth, brighter toward the anterior chest wall; slices differ a little in gain
    x, y = _grid(a)
    xn, yn = x / (a.cols * a.pixel / 2), y / (a.rows * a.pixel / 2)
    c = a.bias * 0.2
    bias = np.exp(c[0] * xn + c[1] * yn + c[2] * xn * xn + c[3] * yn * yn + c[4] * xn * yn - (0.3 + abs(c[5])) * yn)
    image = image * bias[0] * (1 + 0.03 * rng.standard_normal((a.slices, 1, 1), dtype=np.float32))

    # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels
    real = image + a.noise * rng.standard_normal(image.shape, dtype=np.float32)
    imag = a.noise * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag) * a.gain
    return np.round(np.minimum(image, 32767)).astype(np.float32)


def synthesize_patient(index: int, seed: int = 0) -> SyntheticPatient:
    """Draw and render synthetic patient ``index`` (1-based) of the data set with ``seed``.

    The result depends only on ``(index, seed)``: patient 7 is the same whether 10 or 50 are written.
    Volumes are ``(Z, H, W)`` with Z in 8..12 slices (slice 0 at the base), H and W in 160..208 pixels.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 1 <= index <= 999:
        raise ValueError(f"patient index must be an integer in 1..999, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    index, seed = int(index), int(seed)
    group = GROUPS[(index - 1) % len(GROUPS)]
    anatomy = _calibrate(_draw_anatomy(np.random.default_rng([seed, index, 0]), group))
    scene = np.random.default_rng([seed, index, 1])
    textures, dots = _textures(anatomy, scene)
    static, cavity = _static_tissues(anatomy, textures[0], textures[1], scene)
    images, labels = {}, {}
    for number, phase in enumerate(("ED", "ES")):
        scene_phase = _moving_tissues(anatomy, phase, static, cavity, textures)
        labels[phase] = scene_phase.label
        noise = np.random.default_rng([seed, index, 2 + number])
        images[phase] = _render(anatomy, scene_phase, textures, dots, noise)

    info = np.random.default_rng([seed, index, 4])
    nb_frame = int(info.integers(20, 31))
    es_frame = int(np.clip(round(nb_frame * info.uniform(0.33, 0.45)) + 1, 8, 15))
    height = float(np.clip(info.normal(172, 9), 150, 200))
    bmi = info.normal(27 if group in ("DCM", "MINF") else 25, 3.5)
    weight = float(np.clip(bmi * (height / 100) ** 2, 45, 140))
    a = anatomy
    summary = {"lv_radius_mm": a.radius, "wall_mm": a.wall, "lv_length_mm": a.length,
               "base_descent_mm": a.descent, "lv_contraction": a.contraction,
               "target_lv_ef": a.lv_ef, "target_rv_ef": a.rv_ef,
               "slice_thickness_mm": a.thickness, "heart_angle_deg": float(np.rad2deg(a.angle))}
    return SyntheticPatient(
        patient_id=f"patient{index:03d}", group=group, ed_frame=1, es_frame=es_frame, nb_frame=nb_frame,
        height=round(height, 1), weight=round(weight, 1), spacing=(a.spacing_z, a.pixel, a.pixel),
        ed_image=images["ED"], ed_label=labels["ED"], es_image=images["ES"], es_label=labels["ES"],
        anatomy=summary,
    )


# --- writing the ACDC layout ----------------------------------------------------------------------------
_OURS = re.compile(r"^(Info\.cfg|patient\d{3}_frame\d{2}(_gt)?\.nii\.gz)$")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _readme(patients: int, seed: int) -> str:
    return (
        f"{_README_MARK} data set, written by kpssl.data.synthetic.write_synthetic_acdc"
        f"(patients={patients}, seed={seed}).\n\n"
        "Layout as ACDC: training/patientNNN/Info.cfg, patientNNN_frameNN.nii.gz (image) and\n"
        "patientNNN_frameNN_gt.nii.gz (labels: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity)\n"
        "for the end-diastolic (ED) and end-systolic (ES) frames named in Info.cfg. No 4D cine files.\n\n"
        "Each patient is a short-axis stack (8-12 slices of 7-10 mm, slice 0 at the base, in-plane\n"
        "1.3-1.7 mm, 160-208 pixels) drawn from an anatomical model and rendered like bSSFP cine MRI\n"
        "(bright blood and fat, dark lungs, grey muscle and liver, blur, coil bias, Rician noise).\n"
        f"Groups cycle {', '.join(GROUPS)} with the patient number. A patient depends only on its\n"
        "number and the seed. These are not real patients; do not report results on them as ACDC.\n"
    )


def _looks_synthetic(out: Path) -> bool:
    readme = out / "README.txt"
    if not readme.is_file():
        return False
    return readme.read_text(errors="replace").startswith(_README_MARK)


def write_synthetic_acdc(out: str | Path, patients: int, seed: int = 0, progress: bool = False) -> list[Path]:
    """Write ``patients`` synthetic patients to ``out`` in the ACDC layout; returns the patient folders.

    Writes ``out/training/patientNNN/{Info.cfg, patientNNN_frameNN.nii.gz, patientNNN_frameNN_gt.nii.gz}``
    for the ED and ES frames, each file atomically, and ``out/README.txt``. Refuses (``DataError``) a
    non-empty ``out`` that is not a previous synthetic set; a previous set is overwritten, and patient
    folders beyond ``patients`` left by it are removed.
    """
    out = Path(out)
    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or not 1 <= patients <= 999:
        raise ValueError(f"patients must be an integer in 1..999, got {patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _looks_synthetic(out):
        raise DataError(out, "folder is not empty and is not a kpssl synthetic data set (no README.txt from "
                             "write_synthetic_acdc); refusing to write into it. Choose an empty or new folder.")
    training = out / "training"
    training.mkdir(parents=True, exist_ok=True)
    _write_text(out / "README.txt", _readme(patients, seed))
    for stale in sorted(training.glob("patient[0-9][0-9][0-9]")):
        if stale.is_dir() and int(stale.name[7:]) > patients and all(_OURS.match(f.name) for f in stale.iterdir()):
            shutil.rmtree(stale)

    folders = []
    start = time.perf_counter()
    for index in range(1, patients + 1):
        patient = synthesize_patient(index, seed)
        folder = training / patient.patient_id
        folder.mkdir(exist_ok=True)
        written = {"Info.cfg"}
        for frame, (image, label) in patient.frames().items():
            name = f"{patient.patient_id}_frame{frame:02d}"
            write_volume(folder / f"{name}.nii.gz", image, patient.spacing)
            write_volume(folder / f"{name}_gt.nii.gz", label, patient.spacing, label=True)
            written |= {f"{name}.nii.gz", f"{name}_gt.nii.gz"}
        _write_text(folder / "Info.cfg", "".join(f"{k}: {v}\n" for k, v in patient.info().items()))
        for stale in folder.iterdir():  # frames of an earlier run with another seed
            if stale.is_file() and stale.name not in written and _OURS.match(stale.name):
                stale.unlink()
        folders.append(folder)
        if progress:
            print(f"\r{patient.patient_id} ({index}/{patients}, {time.perf_counter() - start:.1f} s)",
                  end="" if index < patients else "\n", file=sys.stderr, flush=True)
    return folders
