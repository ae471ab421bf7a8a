"""One DICOM object as a grey image in [-1, 1], or the short reason it cannot be one.

Pixels are decoded by pydicom with the pylibjpeg plugins and GDCM installed, so hospital
exports in any common transfer syntax load: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
RLE, deflate, big endian. Compressed data pydicom's plugins all refuse gets one more try with
GDCM's own reader (it reads the 12-bit lossy JPEG NEMA's sample files write, which pydicom's
plugins reject).

Decisions, for a training set of patients' greyscale images:
- A multi-frame object (a CT/MR volume, a cine loop) gives its middle frame: one image per
  object, as a radiograph does. One image per frame would let one patient's volume of near-
  identical slices outweigh every radiograph in the silo; the middle slice of a volume usually
  passes through the organ it was acquired for.
- Colour (RGB, YBR_*, palette) is not converted but refused as "colour". In DICOM, colour pixels
  are a photograph, an endoscopy, Doppler ultrasound, or a screenshot whose window and often
  whose text (names, dates: what a diffusion model can memorise and reproduce) are burned in;
  none is an acquisition of the greyscale modalities fedgen models. (The PNG loader converts
  colour because a folder of PNGs is one the user curated.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from fedgen.data.dataset import DataError, to_unit_range

DICOM_SUFFIXES = (".dcm", ".dicom")
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# pydicom reports a bad file in many ways; all mean "this file is not usable".
READ_ERRORS = (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, OSError,
               EOFError, NotImplementedError, RuntimeError, IndexError)  # fmt: skip


class UnusableDicom(DataError):
    """A file that gives no grey image. `cause` is short and shared by files alike ("colour",
    "no pixel data", ...), so a folder's skipped files can be counted by cause."""

    def __init__(self, file: Path, cause: str, detail: str):
        super().__init__(f"{file}: {cause} ({detail})")
        self.cause = cause


def is_dicom_file(path: Path) -> bool:
    """Named *.dcm / *.dicom, or any other file with the DICOM preamble's "DICM" at byte 128:
    DICOMDIR media name their files without a suffix (IM000001), PACS exports often by UID."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False  # cannot tell, and neither could pydicom


def _first(value) -> float:
    """A DICOM number that may be multi-valued (several windows): the first value."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _frame_value(ds: Dataset, frame: int, macro: str, keyword: str):
    """A top-level attribute, else where Enhanced multi-frame objects keep it: in the
    functional group `macro` of this frame, else of all frames (shared). None if absent."""
    if keyword in ds:
        return ds[keyword].value
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):  # fmt: skip
        items = ds.get(groups)
        if items and index < len(items) and items[index].get(macro):
            item = items[index].get(macro)[0]
            if keyword in item:
                return item[keyword].value
    return None


def _gdcm_frames(file: Path) -> np.ndarray:
    """Every frame [F, H, W] of a greyscale file, decoded by GDCM's own reader."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(file))
    if not reader.Read():
        raise RuntimeError("GDCM cannot read it either")
    image = reader.GetImage()
    dtype = np.dtype(image.GetPixelFormat().GetScalarTypeAsString().lower())  # UINT16: uint16
    buffer = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM's bytes, as a str
    return np.frombuffer(buffer, dtype).reshape(-1, image.GetDimension(1), image.GetDimension(0))


def _decode(file: Path, ds: Dataset, frame: int, compressed: bool) -> np.ndarray:
    """Stored values of one frame [H, W]."""
    ds.pixel_array_options(index=frame)  # decode only this frame, not the whole volume
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError):
        if not compressed:
            raise
        try:
            return _gdcm_frames(file)[frame]
        except (ImportError, AttributeError, RuntimeError, ValueError, TypeError, IndexError):
            pass
        raise  # pydicom's error names every plugin it tried and why each failed


def read_dicom(file: Path, window: tuple[float, float] | None) -> tuple[np.ndarray, str, str]:
    """One DICOM object as ([H, W] in [-1, 1] with bone bright, patient id, source).

    Raises UnusableDicom: "not DICOM", "no pixel data", "colour", "unsupported compression",
    "corrupt", "invalid window". See load_dicom_folder for the pixel transform.
    """
    try:
        ds = pydicom.dcmread(file)
    except READ_ERRORS as err:
        cause = "not DICOM" if isinstance(err, InvalidDicomError) else "corrupt"
        raise UnusableDicom(file, cause, str(err)) from err
    if not any(keyword in ds for keyword in PIXEL_DATA):
        kind = str(ds.get("Modality", "")).strip() or "no Modality"
        raise UnusableDicom(file, "no pixel data", f"{kind}, e.g. a structure set or report")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric and photometric not in GREYSCALE:
        raise UnusableDicom(file, "colour", f"PhotometricInterpretation {photometric!r}")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    compressed = bool(syntax and syntax.is_transfer_syntax and syntax.is_compressed)
    try:
        frame = int(ds.get("NumberOfFrames") or 1) // 2  # the middle frame (module docstring)
        raw = _decode(file, ds, frame, compressed)
        # Stored values to modality units (e.g. Hounsfield, or detector units for radiographs).
        slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        values = raw.astype(np.float64) * (1.0 if slope is None else _first(slope))
        values += 0.0 if intercept is None else _first(intercept)
        if window is None:
            centre = _frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter")
            width = _frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth")
            if centre is not None and width is not None:
                window = (_first(centre), _first(width))
    except READ_ERRORS as err:
        cause = "unsupported compression" if compressed else "corrupt"
        raise UnusableDicom(file, cause, str(err)) from err
    if not photometric or raw.ndim != 2:
        raise UnusableDicom(file, "corrupt", f"pixels {raw.shape}, photometric {photometric!r}")
    if window is None:
        pixels = to_unit_range(values)  # no window anywhere: the image's own min..max
    else:
        centre, width = window
        if width <= 0:
            raise UnusableDicom(file, "invalid window", f"window width {width} must be > 0")
        pixels = np.clip((values - (centre - width / 2)) / width, 0.0, 1.0) * 2.0 - 1.0
    if photometric == "MONOCHROME1":  # low values are white: flip so bone is bright
        pixels = -pixels
    if not np.isfinite(pixels).all():
        raise UnusableDicom(file, "corrupt", "pixels not finite after rescaling")
    patient = str(ds.get("PatientID", "")).strip() or file.stem
    source = str(ds.get("Manufacturer", "")).strip() or str(ds.get("InstitutionName", "")).strip()
    return pixels.astype(np.float32), patient, source or "dicom"
