"""Synthetic multi-centre chest X-ray cohorts: phantom radiographs with a planted, tunable prognostic signal.

Why: the demo, the tests and the benchmarks need a cohort that exercises everything real data would (several
images per patient, class imbalance, centres with different scanners and file formats, MONOCHROME1, windowed
and compressed DICOM, 8- and 16-bit PNG, unknown labels) without any real patient data and without a download.
The label signal is known and tunable (`signal`), so a test can check that the pipeline finds it when it is
there (signal=1) and does not hallucinate it when it is not (signal=0).

A phantom is drawn in normalised coordinates (x, y in [-1, 1]) so it looks the same at every `size`: a
soft-tissue body ellipse, two dark lungs, curved rib bands, a heart shadow, a spine, and smooth low-frequency
noise. Positive patients get lung opacities (Gaussian blobs at random positions in every image, plus a basal
haze) whose strength is `signal` × a severity factor. Each centre then "acquires" the phantom with its own
contrast, gamma and noise and writes it in its own formats (see `CENTER_PROFILES`).

Everything is drawn from `numpy.random.default_rng` streams keyed by (seed, patient), DICOM UIDs are hashed
from the seed and the image id, and dates are fixed: the same spec gives a byte-identical manifest and
identical pixels.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from prognosis_cache.errors import PcacheError

# Digital X-Ray Image Storage - For Presentation, and Computed Radiography Image Storage.
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
SEVERITIES = ("mild", "moderate", "severe")
_SEVERITY_GAIN = {"mild": 0.7, "moderate": 1.0, "severe": 1.3}
# P(severity | outcome): severity is correlated with the outcome but does not determine it.
_SEVERITY_P = {0: (0.6, 0.3, 0.1), 1: (0.15, 0.35, 0.5)}
_SEVERITY_BLANK = 0.05  # share of patients whose severity is unknown (blank in the manifest)


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. Defaults give a small, imbalanced (~1:3), two-centre cohort."""

    n_patients: int = 200
    seed: int = 0
    prevalence: float = 0.25  # share of positive patients (~1:3 imbalance)
    images_per_patient: tuple[int, int] = (1, 3)  # inclusive range, drawn per patient
    n_centers: int = 2
    size: int = 256  # image side in pixels
    dicom_share: float = 0.5  # share of images written as DICOM (rest PNG)
    signal: float = 1.0  # strength of the label-dependent opacity (0 = labels are pure noise)

    def __post_init__(self) -> None:
        lo, hi = self.images_per_patient
        problems = [
            (self.n_patients < 1, f"n_patients must be >= 1, got {self.n_patients}"),
            (not 0.0 <= self.prevalence <= 1.0, f"prevalence must be in [0, 1], got {self.prevalence}"),
            (not 1 <= lo <= hi, f"images_per_patient must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}"),
            (not 1 <= self.n_centers <= 26, f"n_centers must be in 1..26, got {self.n_centers}"),
            (self.size < 32, f"size must be >= 32 pixels, got {self.size}"),
            (not 0.0 <= self.dicom_share <= 1.0, f"dicom_share must be in [0, 1], got {self.dicom_share}"),
            (self.signal < 0, f"signal must be >= 0, got {self.signal}"),
        ]
        for bad, message in problems:
            if bad:
                raise PcacheError(message, "fix the cohort specification (see `pcache synth --help`)")


@dataclass(frozen=True)
class CenterProfile:
    """How one centre acquires and stores an image: the nuisance a prognosis model must see through."""

    contrast: float
    gamma: float
    offset: float
    noise_sd: float
    png_bits: int  # 8 or 16
    photometric: str  # DICOM: MONOCHROME2, or MONOCHROME1 (stored values inverted)
    bits_stored: int  # DICOM: 12 or 16
    rescale: tuple[float, float] | None = None  # DICOM (slope, intercept)
    # DICOM (centre, width) as fractions of the full modality range (converted to modality units when written)
    window: tuple[float, float] | None = None
    rle: bool = False  # DICOM written RLE Lossless
    modality: str = "DX"


# Centres cycle through these; with the default two centres, the cohort already holds 8- and 16-bit PNG,
# MONOCHROME1 and MONOCHROME2, rescale slope/intercept, a VOI window and RLE-compressed DICOM.
CENTER_PROFILES: tuple[CenterProfile, ...] = (
    CenterProfile(contrast=1.0, gamma=1.0, offset=0.0, noise_sd=0.010, png_bits=8, photometric="MONOCHROME2",
                  bits_stored=12, rescale=(2.0, -1024.0), modality="CR"),
    CenterProfile(contrast=0.85, gamma=0.8, offset=0.04, noise_sd=0.025, png_bits=16,
                  photometric="MONOCHROME1", bits_stored=16, window=(0.5, 0.9), rle=True),
    CenterProfile(contrast=1.15, gamma=1.2, offset=-0.03, noise_sd=0.015, png_bits=8,
                  photometric="MONOCHROME2", bits_stored=12, window=(0.55, 0.85)),
    CenterProfile(contrast=0.95, gamma=0.9, offset=0.02, noise_sd=0.020, png_bits=16,
                  photometric="MONOCHROME1", bits_stored=12, rescale=(0.5, 100.0), modality="CR"),
)


def center_name(index: int) -> str:
    """center_A, center_B, ... (26 at most)."""
    return f"center_{string.ascii_uppercase[index]}"


def center_profile(index: int) -> CenterProfile:
    """Profile of centre `index`: the base profiles cycle, later cycles get a slightly different gamma."""
    base = CENTER_PROFILES[index % len(CENTER_PROFILES)]
    cycle = index // len(CENTER_PROFILES)
    if cycle == 0:
        return base
    return CenterProfile(**{**base.__dict__, "gamma": base.gamma * (1.0 + 0.07 * cycle)})


# ---------------------------------------------------------------------------------------------------- phantom
def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                  edge: float = 0.06) -> np.ndarray:
    dx, dy = (x - cx) / rx, (y - cy) / ry
    d = np.sqrt(dx * dx + dy * dy)
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / edge, 50.0)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    # Low-frequency texture: a coarse random grid upsampled bicubically (Pillow's resampler, no hand-written
    # filter).
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def render_phantom(rng: np.random.Generator, size: int, anatomy: dict[str, float],
                   opacity: float) -> np.ndarray:
    """One phantom radiograph, float32 (size, size), roughly in [0, 1]; brighter = denser (MONOCHROME2 sense).

    `anatomy` holds the patient's shape parameters (stable across their images); `opacity` (0 = healthy) is
    the strength of the lung opacities. Per-image pose jitter and the opacity positions are drawn from `rng`.
    """
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)  # float32 throughout: twice as fast, plenty precise
    y, x = np.meshgrid(lin, lin, indexing="ij", sparse=True)  # (S, 1) and (1, S): broadcasting does the rest
    # Per-image pose jitter: patients are never positioned twice the same way.
    scale = np.float32(1.0 + 0.03 * rng.standard_normal())
    x = (x - np.float32(0.03 * rng.standard_normal())) / scale
    y = (y - np.float32(0.03 * rng.standard_normal())) / scale

    body = _soft_ellipse(x, y, 0.0, 0.08, anatomy["body_rx"], 0.98, edge=0.04)
    lung_rx, lung_ry, lung_cx = anatomy["lung_rx"], anatomy["lung_ry"], anatomy["lung_cx"]
    lungs = (_soft_ellipse(x, y, -lung_cx, -0.05, lung_rx, lung_ry)
             + _soft_ellipse(x, y, lung_cx, -0.05, lung_rx * 0.95, lung_ry * 0.97))
    heart = _soft_ellipse(x, y, 0.1, 0.28, anatomy["heart_r"] * 1.15, anatomy["heart_r"], edge=0.08)
    xs = (x / 0.07) ** 2
    spine = np.exp(-(xs * xs)) * body
    # Posterior ribs: bands following a parabola, periodic in y; one cosine instead of a loop over ribs.
    phase = np.float32(2 * np.pi / anatomy["rib_spacing"]) * (y + 0.35 * x * x - anatomy["rib_phase"])
    band = 0.5 * (1.0 + np.cos(phase))
    band = band * band * band
    ribs = band * band * _soft_ellipse(x, y, 0.0, -0.1, 0.8, 0.7, edge=0.1) * body

    img = 0.06 + 0.42 * body - 0.26 * lungs + 0.22 * heart * body + 0.16 * spine + 0.09 * ribs
    img += 0.025 * _smooth_noise(rng, size) * body

    if opacity > 0:
        field = np.zeros_like(img)
        for _ in range(int(rng.integers(2, 5))):
            side = rng.choice((-1.0, 1.0))
            r, t = 0.75 * np.sqrt(rng.random()), 2 * np.pi * rng.random()
            bx, by = side * lung_cx + r * lung_rx * np.cos(t), -0.05 + r * lung_ry * np.sin(t)
            sigma = rng.uniform(0.07, 0.15)
            # Separable Gaussian: an outer product of two 1-D profiles instead of an exp over the whole grid.
            gy = np.exp(-((y[:, :1] - by) ** 2) / (2 * sigma**2))
            gx = np.exp(-((x[:1, :] - bx) ** 2) / (2 * sigma**2))
            field += np.float32(rng.uniform(0.6, 1.0)) * (gy * gx)
        basal_haze = 0.4 * np.clip((y + 0.05) / lung_ry + 0.5, 0.0, 1.5)
        img += opacity * 0.22 * np.clip(field + basal_haze, 0.0, 1.6) * np.clip(lungs, 0.0, 1.0)
    return img.astype(np.float32, copy=False)


def _draw_anatomy(rng: np.random.Generator) -> dict[str, float]:
    return {
        "body_rx": rng.uniform(0.78, 0.9),
        "lung_rx": rng.uniform(0.24, 0.29),
        "lung_ry": rng.uniform(0.5, 0.6),
        "lung_cx": rng.uniform(0.36, 0.41),
        "heart_r": rng.uniform(0.18, 0.24),
        "rib_spacing": rng.uniform(0.16, 0.2),
        "rib_phase": rng.uniform(0.0, 0.2),
    }


def acquire(img: np.ndarray, profile: CenterProfile, rng: np.random.Generator) -> np.ndarray:
    """The centre's detector: contrast, offset, gamma and noise; returns float32 in [0, 1]."""
    v = np.clip(np.float32(0.5 + profile.offset) + np.float32(profile.contrast) * (img - 0.5), 0.0, 1.0)
    v = v ** np.float32(profile.gamma)
    v += np.float32(profile.noise_sd) * rng.standard_normal(v.shape, dtype=np.float32)
    return np.clip(v, 0.0, 1.0, out=v)


# ---------------------------------------------------------------------------------------------------- writers
def write_png(path: Path, v: np.ndarray, bits: int) -> None:
    """Quantise [0, 1] to 8 or 16 bits and write a grayscale PNG (16-bit through Pillow's 'I;16' mode)."""
    full = 255 if bits == 8 else 65535
    q = np.round(v * full).astype(np.uint8 if bits == 8 else np.uint16)
    # The fastest zlib level: synthesis speed matters more than a few kilobytes.
    Image.fromarray(q).save(path, format="PNG", compress_level=1)


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                patient_id: str = "anon", uid_key: str = "0", rescale: tuple[float, float] | None = None,
                window: tuple[float, float] | None = None, rle: bool = False, modality: str = "DX",
                institution: str = "") -> None:
    """Write `stored` (uint8/uint16, (H, W) or (frames, H, W)) as a minimal valid DICOM radiograph.

    UIDs are hashed from `uid_key` (never random) and dates are fixed: the file is reproducible byte for byte.
    `rescale` = (slope, intercept) and `window` = (centre, width) in modality units are written as given.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import RLELossless, generate_uid

    sop_class = CR_SOP_CLASS if modality == "CR" else DX_SOP_CLASS
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(stored, photometric, bits_stored, generate_instance_uid=False)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["prognosis-cache synthetic", uid_key, "instance"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["prognosis-cache synthetic", uid_key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["prognosis-cache synthetic", uid_key, "series"])
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = f"Synthetic^{patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "prognosis-cache synthetic phantom"
    ds.InstitutionName = institution
    ds.ImageType = ["DERIVED", "SECONDARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if rle:
        ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _write_dicom_for_center(path: Path, v: np.ndarray, profile: CenterProfile, patient_id: str, uid_key: str,
                            institution: str) -> None:
    full = (1 << profile.bits_stored) - 1
    slope, intercept = profile.rescale or (1.0, 0.0)
    # Presentation value p in [0, 1] → modality value m spanning the stored range → stored s = (m - b) /
    # slope.
    m_lo, m_hi = intercept, intercept + slope * full
    window = None
    if profile.window is not None:
        centre_frac, width_frac = profile.window
        window = (m_lo + centre_frac * (m_hi - m_lo), width_frac * (m_hi - m_lo))
    stored = np.round(v * full)
    if profile.photometric == "MONOCHROME1":
        stored = full - stored  # MONOCHROME1: dense (bright) tissue has the *low* stored value
    write_dicom(path, stored.astype(np.uint16), photometric=profile.photometric,
                bits_stored=profile.bits_stored, patient_id=patient_id, uid_key=uid_key,
                rescale=profile.rescale, window=window, rle=profile.rle, modality=profile.modality,
                institution=institution)


# ---------------------------------------------------------------------------------------------------- cohort
def make_cohort(out_dir: str | os.PathLike, spec: CohortSpec = CohortSpec(), *,
                progress: bool = False) -> Path:
    """Writes images under out_dir/images/ and out_dir/manifest.csv; returns the manifest path.

    Manifest columns: image_id, path (relative to the manifest's folder), patient_id, center, outcome (0/1,
    per patient), severity (mild/moderate/severe, blank = unknown, per patient).
    """
    out = Path(out_dir)
    cohort_rng = np.random.default_rng([spec.seed, 0])
    n = spec.n_patients
    outcome = np.zeros(n, dtype=np.int8)
    outcome[cohort_rng.permutation(n)[: round(spec.prevalence * n)]] = 1
    centers = cohort_rng.permutation(np.arange(n) % spec.n_centers)  # balanced centres, shuffled
    n_images = cohort_rng.integers(spec.images_per_patient[0], spec.images_per_patient[1] + 1, size=n)
    severity: list[str | None] = [str(cohort_rng.choice(SEVERITIES, p=_SEVERITY_P[int(o)])) for o in outcome]
    blank = cohort_rng.random(n) < _SEVERITY_BLANK
    severity = [None if b else s for s, b in zip(severity, blank, strict=True)]

    for c in range(spec.n_centers):
        (out / "images" / center_name(c)).mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, object]] = []
    bar = _progress(progress)
    task = bar.add_task("synthesising phantoms", total=int(n_images.sum())) if bar else None
    try:
        for i in range(n):
            rng = np.random.default_rng([spec.seed, 1, i])
            pid = f"p{i:04d}"
            cname = center_name(int(centers[i]))
            profile = center_profile(int(centers[i]))
            anatomy = _draw_anatomy(rng)
            # Latent severity drives the opacity strength of positives; an unknown severity still has a true
            # value.
            sev_true = severity[i] or str(rng.choice(SEVERITIES, p=_SEVERITY_P[int(outcome[i])]))
            opacity = spec.signal * _SEVERITY_GAIN[sev_true] if outcome[i] else 0.0
            for j in range(int(n_images[i])):
                image_id = f"{pid}_i{j}"
                v = acquire(render_phantom(rng, spec.size, anatomy, opacity), profile, rng)
                as_dicom = rng.random() < spec.dicom_share
                rel = f"images/{cname}/{image_id}.{'dcm' if as_dicom else 'png'}"
                if as_dicom:
                    _write_dicom_for_center(out / rel, v, profile, pid, f"{spec.seed}/{image_id}", cname)
                else:
                    write_png(out / rel, v, profile.png_bits)
                rows.append({"image_id": image_id, "path": rel, "patient_id": pid, "center": cname,
                             "outcome": int(outcome[i]), "severity": severity[i]})
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()

    manifest = out / "manifest.csv"
    schema = {"image_id": pl.String, "path": pl.String, "patient_id": pl.String, "center": pl.String,
              "outcome": pl.Int8, "severity": pl.String}
    pl.DataFrame(rows, schema=schema).write_csv(manifest)
    return manifest


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    return bar
