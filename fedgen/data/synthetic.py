"""Synthetic PA chest X-rays: patients with their own anatomy, an optional nodule, hospital styles.

The images stand in for real radiographs when none may be downloaded. What matters for the
experiments is kept: several images per patient (so membership is a patient-level question),
a finding a classifier can learn (a nodule, label 1), and acquisition differences between
sources (so federated silos are non-IID the way hospitals are).

Geometry lives in normalised coordinates: x and y in [-1, 1], x to the image right (the
patient's left, as on a PA film), y downwards. Anatomy is an attenuation map (soft tissue minus
lung air plus bone, heart, ...) rendered at twice the output size, averaged down by area,
then passed through the source's tone curve, blur and noise.

Randomness: each patient draws from np.random.default_rng([seed, source, 2, patient]), so a
patient's images do not depend on how many other patients are generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from fedgen.data.dataset import DataError, ImageSet

_SUPERSAMPLE = 2  # render at 2x and area-average: smooth edges without a 4x cost
_PIXELS_PER_CHUNK = 2**18  # small work arrays (1 MB) stay in cache: faster than one big batch
_PATIENT_STREAM, _PROFILE_STREAM = 2, 1  # keep profile and patient random streams apart
_TEXTURE_WAVES = 6


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one source (hospital scanner) turns anatomy into pixels.

    gamma:      exponent of the tone curve on brightness in [0, 1] (> 1 darkens mid-tones)
    contrast:   gain around mid-grey
    brightness: additive exposure offset, brightness units
    noise_std:  per-pixel Gaussian noise, brightness units (same at every image size)
    blur:       Gaussian blur sigma, normalised units (the image is 2 wide)
    zoom:       field-of-view magnification (> 1 shows the anatomy larger)
    offset_x, offset_y: where the patient sits in the frame, normalised units
    heel:       left-to-right brightness gradient (the anode heel effect)
    """

    gamma: float
    contrast: float
    brightness: float
    noise_std: float
    blur: float
    zoom: float
    offset_x: float
    offset_y: float
    heel: float


# (low, high, stride) per AcquisitionProfile field. Source s takes the fraction
# (start + s * stride) mod 1 of each range: an irrational stride spreads consecutive sources
# apart (a low-discrepancy sequence), so even two silos differ clearly, which independent
# draws would not guarantee.
_PROFILE_RANGES = {
    "gamma": (0.7, 1.5, 0.6180),
    "contrast": (0.8, 1.2, 0.4142),
    "brightness": (-0.1, 0.1, 0.7321),
    "noise_std": (0.005, 0.05, 0.2361),
    "blur": (0.0, 0.03, 0.6458),
    "zoom": (0.9, 1.1, 0.3166),
    "offset_x": (-0.06, 0.06, 0.1623),
    "offset_y": (-0.06, 0.06, 0.6056),
    "heel": (-0.08, 0.08, 0.4495),
}


def acquisition_profile(source: int, seed: int) -> AcquisitionProfile:
    """The acquisition parameters of `source`; deterministic in (seed, source).

    The seed picks where each parameter's sequence starts; the source steps along it.
    """
    if source < 0:
        raise DataError(f"source must be >= 0, got {source}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    starts = np.random.default_rng([seed, _PROFILE_STREAM]).random(len(_PROFILE_RANGES))
    values = {}
    for start, (name, (lo, hi, stride)) in zip(starts, _PROFILE_RANGES.items(), strict=True):
        values[name] = float(lo + (hi - lo) * ((start + source * stride) % 1.0))
    return AcquisitionProfile(**values)


def _ramp(d, width: float = 0.025):
    """1 where d > width/2, 0 where d < -width/2, linear between: a soft inside-test."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _lung_field(x, y, p):
    """Both lungs in patient coordinates: (mask in [0, 1], margin to its border, diaphragm y).

    Each lung: rounded apex at p['lung_top'], widening downwards, cut by a parabolic
    diaphragm dome whose lowest (lateral) point is the costophrenic angle p['lung_cp'].
    The right dome (image left) sits higher than the left.
    """
    q = np.abs(x)
    u = np.clip((y - p["lung_top"]) / (p["lung_cp"] - p["lung_top"]), 0.0, 1.0)
    half_width = p["lung_hw"] * np.sqrt(1.0 - (1.0 - u) ** 2)
    centre = p["lung_qc"] - 0.06 * (1.0 - u)  # apices sit more medially than the bases
    side_margin = half_width - np.abs(q - centre)
    dome_top = p["lung_cp"] - np.where(x < 0, p["dome_r"], p["dome_l"])
    dome_q = p["lung_qc"] - 0.05
    curvature = (p["lung_cp"] - dome_top) / (p["lung_hw"] + 0.05) ** 2
    diaphragm = dome_top + curvature * (q - dome_q) ** 2
    margin = np.minimum(side_margin, diaphragm - y)
    return _ramp(side_margin) * _ramp(diaphragm - y), margin, diaphragm


def _heart_field(x, y, p):
    """Squared elliptic radius of the heart (< 1 inside); centred near the left dome, so only
    its upper part shows above the diaphragm, its top hidden in the mediastinum."""
    dx, dy = x - p["heart_x"], y - p["heart_y"]
    c, s = math.cos(0.35), math.sin(0.35)  # ~20 degrees: apex points down and to the image right
    along, across = c * dx + s * dy, -s * dx + c * dy
    return (along / (0.42 * p["heart_scale"])) ** 2 + (across / (0.36 * p["heart_scale"])) ** 2


def _rib_bands(q, y, first, spacing, bend, count: int):
    """Parallel curved bands y = first + k*spacing + bend(q), k < count; profile in [0, 1]."""
    t = (y - bend - first) / spacing
    k = np.floor(t)
    phase = (t - k) * spacing  # distance below the k-th rib's upper edge
    thickness = 0.45 * spacing
    profile = np.clip(1.0 - np.abs(phase - thickness / 2) / (thickness / 2), 0.0, 1.0) ** 0.5
    return profile * ((k >= 0) & (k < count))


def _texture(x, y, p):
    """Mean of a patient's plane waves (wave vectors tex_kx, tex_ky, phases tex_p): in [-1, 1]."""
    total = 0.0
    for i in range(_TEXTURE_WAVES):
        total = total + np.sin(
            p["tex_kx"][..., i] * x + p["tex_ky"][..., i] * y + p["tex_p"][..., i]
        )
    return total / _TEXTURE_WAVES


def _attenuation(x, y, p):
    """Attenuation map (≈ 0 air, ≈ 1 soft tissue, more for bone) at patient coordinates x, y."""
    q = np.abs(x)
    # Neck at the top edge, sloping shoulders (with the deltoid bulge), then the chest wall.
    shoulder = np.clip((y + 0.6) / 0.4, -1.0, 0.0)
    body_half = 0.3 + (p["body_w"] - 0.3) * np.sqrt(1.0 - shoulder**2)
    body_half = body_half + 0.18 * np.exp(-(((y + 0.66) / 0.2) ** 2))
    body = _ramp(body_half - q, 0.05)
    depth = np.sqrt(np.clip(1.0 - (x / body_half) ** 2, 0.02, 1.0))  # a cylinder's chord
    a = 0.95 * p["tissue"] * body * depth

    lung, lung_margin, diaphragm = _lung_field(x, y, p)
    heart = _heart_field(x, y, p)
    ribs_seen = 0.35 + 0.65 * lung  # bone contrast is lost over dense tissue (film shoulder)
    lung = lung * (1.0 - _ramp(1.0 - heart, 0.15))  # the heart displaces lung: crisp borders
    texture = _texture(x, y, p)
    # Vessels fan out from the hila and thin towards the periphery; texture breaks the symmetry.
    hilum = np.hypot(q - 0.17, y + 0.02)
    fan = np.cos(16.0 * np.arctan2(y + 0.02, q - 0.17) + 2.0 * texture)
    vessels = np.exp(-hilum / 0.25) * (0.6 + 0.4 * fan)
    air = 0.62 * p["tissue"] * (0.6 + 0.4 * np.clip(lung_margin / 0.12, 0.0, 1.0))
    a = a - lung * (air - 0.06 * texture - 0.4 * vessels)

    a = a + 0.3 * np.sqrt(np.clip(1.0 - heart, 0.0, 1.0)) * _ramp(diaphragm - y, 0.1)
    pedicle = _ramp(0.12 - np.abs(x - 0.01)) * _ramp(y + 0.62, 0.1) * _ramp(p["heart_y"] - y, 0.2)
    knob = _ramp(0.075 - np.hypot(x - 0.13, y + 0.3), 0.03)  # the aortic knob
    trachea = _ramp(0.038 - np.abs(x), 0.02) * _ramp(-0.22 - y, 0.05)
    a = a + 0.22 * pedicle + 0.2 * knob - 0.25 * trachea

    disc = _ramp(np.cos(2 * np.pi * (y - p["rib_first"]) / p["rib_sp"]) - 0.85, 0.2)
    a = a + 0.32 * _ramp(0.07 - q, 0.03) * (1.0 - 0.45 * disc)  # vertebral bodies and discs

    chest_wall = _ramp(0.93 * body_half - q, 0.05) * _ramp(q - 0.07, 0.03)
    bend = p["rib_bend"] * ((q - 0.15) ** 2 - 0.0225)
    posterior = _rib_bands(q, y, p["rib_first"], p["rib_sp"], bend, 10)
    anterior = _rib_bands(q, y, p["rib_first"] + 0.1, p["rib_sp"] * 1.1, 0.4 * (0.8 - q), 6)
    a = a + chest_wall * ribs_seen * (0.2 * posterior + 0.07 * anterior * _ramp(q - 0.2, 0.1))

    clavicle_y = (
        p["clav_y"] - p["clav_slope"] * (q - 0.05) + 0.03 * np.sin(np.pi * (q - 0.05) / 0.6)
    )
    clavicle = _ramp(0.032 - np.abs(y - clavicle_y), 0.02) * _ramp(q - 0.05) * _ramp(0.65 - q, 0.05)
    humerus = np.hypot(q - p["body_w"] - 0.1, y + 0.74)
    a = a + 0.3 * clavicle + 0.3 * _ramp(0.18 - humerus, 0.04)

    bubble = np.hypot((x - 0.5) / 1.6, y - (p["lung_cp"] - p["dome_l"] + 0.06 + p["bubble"]))
    a = a - 0.25 * _ramp(p["bubble"] - bubble, 0.03)
    nodule = np.hypot(x - p["nod_x"], y - p["nod_y"]) / p["nod_r"]
    return a + 0.35 * p["nod_on"] * np.exp(-(nodule**2))


# Per-patient anatomy, (low, high) in normalised units; heart_y is relative to the left dome.
# fmt: off
_ANATOMY_RANGES = {
    "body_w": (0.8, 0.95), "tissue": (0.85, 1.2),
    "lung_hw": (0.3, 0.36), "lung_qc": (0.42, 0.47), "lung_top": (-0.72, -0.6),
    "lung_cp": (0.45, 0.6), "dome_r": (0.2, 0.3), "dome_l": (0.14, 0.22),
    "heart_scale": (0.85, 1.25), "heart_x": (0.1, 0.18), "heart_y": (-0.08, 0.0),
    "rib_sp": (0.11, 0.135), "rib_bend": (0.9, 1.3), "rib_first": (-0.74, -0.66),
    "clav_y": (-0.66, -0.56), "clav_slope": (0.1, 0.3), "bubble": (0.0, 0.08),
    "pose_x": (-0.04, 0.04), "pose_y": (-0.04, 0.04), "pose_angle": (-0.05, 0.05),
    "nod_r": (0.05, 0.08),
}
# fmt: on


def _draw_patient(rng: np.random.Generator, finding_rate: float) -> dict[str, np.ndarray | float]:
    """One patient's anatomy (and nodule, with probability finding_rate); lengths normalised."""
    u = rng.uniform
    p: dict[str, np.ndarray | float] = {k: u(lo, hi) for k, (lo, hi) in _ANATOMY_RANGES.items()}
    p["tex_p"] = u(0.0, 2 * np.pi, _TEXTURE_WAVES)
    p["heart_y"] += p["lung_cp"] - p["dome_l"]  # the heart rests on the left dome
    frequency, direction = u(12.0, 30.0, _TEXTURE_WAVES), u(0.0, np.pi, _TEXTURE_WAVES)
    p["tex_kx"], p["tex_ky"] = frequency * np.cos(direction), frequency * np.sin(direction)
    # The nodule's place is drawn even without a finding, so that the same seed gives the same
    # patient with and without it (a counterfactual pair). Rejection sampling keeps it well
    # inside a lung field and clear of the heart; a lung is ~25% of the box, 256 tries suffice.
    has_finding = rng.random() < finding_rate
    x, y = u(-0.85, 0.85, 256), u(-0.5, 0.5, 256)
    _, margin, _ = _lung_field(x, y, p)
    ok = np.flatnonzero((margin > p["nod_r"] + 0.06) & (_heart_field(x, y, p) > 1.4))
    if len(ok) == 0:
        raise RuntimeError("no room for a nodule; the anatomy ranges are inconsistent")
    p.update(nod_x=float(x[ok[0]]), nod_y=float(y[ok[0]]), nod_on=float(has_finding))
    return p


def _draw_view(rng: np.random.Generator, patient: dict) -> dict[str, float]:
    """One image of the patient: small pose, inspiration and exposure changes."""
    inspiration = rng.uniform(-0.04, 0.04)  # deeper breath: lower domes, taller lungs
    return {
        "dx": patient["pose_x"] + rng.uniform(-0.02, 0.02),
        "dy": patient["pose_y"] + rng.uniform(-0.02, 0.02),
        "angle": patient["pose_angle"] + rng.uniform(-0.03, 0.03),
        "lung_cp": patient["lung_cp"] + inspiration,
        "exposure": rng.uniform(-0.03, 0.03),
        "noise_seed": float(rng.integers(2**31)),
    }


def _render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Brightness images [B, size, size] in [0, 1] from per-image parameters (arrays [B, ...])."""
    n_render = size * _SUPERSAMPLE
    centres = (np.arange(n_render, dtype=np.float32) + 0.5) / n_render * 2 - 1
    gx, gy = centres[None, None, :], centres[None, :, None]
    noise_seeds = p["noise_seed"].astype(np.int64)
    p = {k: v.reshape(len(v), 1, 1, *v.shape[1:]).astype(np.float32) for k, v in p.items()}
    # Image -> patient coordinates: undo the source's field of view, then the patient's pose.
    x0 = (gx - p["offset_x"]) / p["zoom"] - p["dx"]
    y0 = (gy - p["offset_y"]) / p["zoom"] - p["dy"]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    x, y = c * x0 + s * y0, -s * x0 + c * y0
    brightness = np.tanh(np.clip(_attenuation(x, y, p), 0.0, None) / 1.2)
    b = brightness.reshape(-1, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))
    b = b ** p["gamma"]
    b = 0.5 + p["contrast"] * (b - 0.5) + p["brightness"] + p["exposure"]
    b = b + p["heel"] * centres[None, None, ::_SUPERSAMPLE]
    for i in range(len(b)):
        sigma = float(p["blur"][i, 0, 0]) * size / 2
        if sigma > 0.05:
            b[i] = gaussian_filter(b[i], sigma, mode="nearest")
        noise = np.random.default_rng(int(noise_seeds[i])).standard_normal((size, size))
        b[i] += float(p["noise_std"][i, 0, 0]) * noise.astype(np.float32)
    return np.clip(b, 0.0, 1.0)


def generate_xrays(
    num_patients: int,
    images_per_patient: int,
    image_size: int,
    num_sources: int,
    finding_rate: float,
    seed: int,
    first_source: int = 0,
    first_patient: int = 0,
) -> ImageSet:
    """Synthetic chest X-rays: images [num_patients * images_per_patient, 1, S, S] in [-1, 1].

    Patient j belongs to source first_source + j % num_sources (a source is a scanner with its own
    style; `first_source` keeps another collection's patients and scanners apart, as the public
    archive does), has id "s{source}-p{j:05d}" and all its
    images together. The finding is drawn per patient (a nodule persists between a patient's
    films): with probability finding_rate the patient has one nodule, label 1, in every image;
    otherwise label 0. Everything else about a patient is the same whatever finding_rate is.
    Patients are numbered from `first_patient`: patient j is the same image whichever range holds
    it, so a later range gives new patients of the same scanners.
    """
    for name, value in (
        ("num_patients", num_patients),
        ("images_per_patient", images_per_patient),
        ("num_sources", num_sources),
    ):
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    if image_size < 16:
        raise DataError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 <= finding_rate <= 1.0:
        raise DataError(f"finding_rate must be in [0, 1], got {finding_rate}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")

    if first_source < 0 or first_patient < 0:
        raise DataError(f"first_source and first_patient must be >= 0, got {first_source} and {first_patient}")
    profiles = [acquisition_profile(first_source + s, seed) for s in range(num_sources)]
    rows: list[dict] = []
    patient_ids, labels, sources = [], [], []
    for j in range(first_patient, first_patient + num_patients):
        source = first_source + j % num_sources
        rng = np.random.default_rng([seed, source, _PATIENT_STREAM, j])
        patient = _draw_patient(rng, finding_rate)
        acquisition = {
            f.name: getattr(profiles[j % num_sources], f.name) for f in fields(AcquisitionProfile)
        }
        for _ in range(images_per_patient):
            rows.append({**patient, **_draw_view(rng, patient), **acquisition})
            patient_ids.append(f"s{source}-p{j:05d}")
            labels.append(int(patient["nod_on"]))
            sources.append(f"synthetic-{source}")

    chunk = max(1, _PIXELS_PER_CHUNK // (image_size * _SUPERSAMPLE) ** 2)
    images = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        params = {k: np.array([r[k] for r in part], dtype=np.float64) for k in part[0]}
        images.append(_render(params, image_size))
    pixels = np.concatenate(images).astype(np.float32) * 2.0 - 1.0
    return ImageSet(
        images=torch.from_numpy(pixels).unsqueeze(1),
        patient_ids=np.array(patient_ids),
        labels=np.array(labels, dtype=np.int64),
        sources=np.array(sources),
    )
