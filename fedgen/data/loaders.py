"""Real images into an ImageSet: MedMNIST .npz files, PNG/JPEG folders, DICOM folders.

Every loader returns images [N, 1, S, S] in [-1, 1]: grey, centre-cropped to a square (so
anatomy is never stretched), resized to S with antialiased bilinear interpolation. A file that
cannot be read raises DataError naming it; nothing is skipped silently, because a silo that
quietly lost half its patients would make every privacy and utility number wrong. DICOM
exports are the exception, since they mix images with reports, structure sets and colour
captures: with unreadable="skip" those are left out and counted by cause in one logged line.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedgen.data.dataset import DataError, ImageSet
from fedgen.data.dicom import DICOM_SUFFIXES, UnusableDicom, is_dicom_file, read_dicom

MEDMNIST_SPLITS = ("train", "val", "test")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNREADABLE = ("skip", "error")  # what load_dicom_folder does with a file that is no grey image
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L"


def _square_resize(images: np.ndarray, size: int) -> torch.Tensor:
    """Images [N, H, W] in [-1, 1] to [N, 1, size, size]: centre crop to a square, resize."""
    _, h, w = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    square = square[:, None, top : top + side, left : left + side]
    if side != size:
        square = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True)
    return square.clamp(-1.0, 1.0)


def _files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under root (recursively) with one of the suffixes (None: any), sorted for
    determinism."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes)
    )


def _check_size(image_size: int) -> None:
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")


def load_medmnist(
    path: str | Path, image_size: int, splits: tuple[str, ...] = MEDMNIST_SPLITS
) -> ImageSet:
    """A MedMNIST .npz (keys {split}_images uint8 [N, H, W] or [N, H, W, 3], {split}_labels).

    RGB becomes grey (ITU-R 601 luma). Pixels scale by the fixed uint8 range, x / 127.5 - 1,
    not per image, so brightness differences survive. Labels [N] or [N, 1] are kept as they
    are; multi-label [N, K] (ChestMNIST) becomes 1 if any finding is present, else 0.
    Caveat: MedMNIST has no patient ids, so each image is its own patient ("train-000123");
    ChestMNIST images of one patient may therefore land on both sides of a split.
    """
    _check_size(image_size)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path.name}: not a readable .npz file ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path.name}: a single array, not a MedMNIST .npz archive")
    parts = []
    with archive:
        for split in splits:
            if split not in MEDMNIST_SPLITS:
                raise DataError(f"unknown MedMNIST split {split!r}; known: {MEDMNIST_SPLITS}")
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in archive.files:
                    raise DataError(f"{path.name}: missing key {key!r} (has {archive.files})")
            try:
                images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise DataError(f"{path.name}: cannot read split {split!r} ({err})") from err
            parts.append(_medmnist_split(path.name, split, images, labels, image_size))
    return ImageSet.concat(parts)


def _medmnist_split(
    name: str, split: str, images: np.ndarray, labels: np.ndarray, image_size: int
) -> ImageSet:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{name}: {key} has dtype {images.dtype}; expected uint8")
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (rgb or images.ndim == 3):
        raise DataError(
            f"{name}: {key} has shape {images.shape}; expected [N, H, W] or [N, H, W, 3]"
        )
    if len(images) == 0:
        raise DataError(f"{name}: {key} is empty")
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.any(labels > 0, axis=1)  # multi-label: any finding
    elif labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{name}: {split}_labels has shape {labels.shape} for {len(images)} images")
    resized = []
    for start in range(0, len(images), 4096):  # bounds the float copy of a large split
        grey = images[start : start + 4096].astype(np.float32)
        grey = grey @ _LUMA if rgb else grey
        resized.append(_square_resize(grey / 127.5 - 1.0, image_size))
    return ImageSet(
        images=torch.cat(resized),
        patient_ids=np.array([f"{split}-{i:06d}" for i in range(len(images))]),
        labels=labels.astype(np.int64),
        sources=np.full(len(images), f"medmnist-{split}"),
    )


def _read_picture(file: Path) -> np.ndarray:
    """One PNG/JPEG as grey [H, W] in [-1, 1], scaled by its bit depth's full range."""
    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                pixels = np.asarray(image).astype(np.float32)
            else:  # 1-bit, 8-bit grey, palette, RGB(A): PIL's luma conversion
                pixels = np.asarray(image.convert("L")).astype(np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{file}: cannot read image ({err})") from err
    if mode == "F":
        raise DataError(f"{file}: floating-point pixels have no known range")
    full_scale = 65535.0 if mode.startswith("I") else 255.0
    if pixels.min() < 0 or pixels.max() > full_scale:
        raise DataError(f"{file}: {mode} pixels outside [0, {full_scale:.0f}]")
    return pixels / full_scale * 2.0 - 1.0


def _read_manifest(csv_path: Path, root: Path) -> list[tuple[Path, str, int]]:
    """(file, patient id, label) rows of a CSV with header file,patient_id[,label]."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"file", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path.name}: header lacks columns {sorted(missing)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            file, patient = (row["file"] or "").strip(), (row["patient_id"] or "").strip()
            where = f"{csv_path.name} line {line}"
            if not file or not patient:
                raise DataError(f"{where}: empty file or patient_id")
            if not (root / file).is_file():
                raise DataError(f"{where}: {file} does not exist under {root}")
            label = (row.get("label") or "").strip()
            try:
                value = int(label) if label else -1
            except ValueError:
                raise DataError(f"{where}: label {label!r} of {file} is not an integer") from None
            rows.append((root / file, patient, value))
    if not rows:
        raise DataError(f"{csv_path.name}: no rows")
    return rows


def load_image_folder(
    path: str | Path, image_size: int, csv_path: str | Path | None = None
) -> ImageSet:
    """PNG/JPEG files under path (recursively, sorted), 8- or 16-bit, grey or RGB.

    With csv_path (columns file,patient_id and optionally label; file relative to path; a
    blank label is -1) the CSV lists exactly the images: a listed file that is missing, or an
    image under path that the CSV does not list, raises DataError. Without it each file is its
    own patient, id = its path relative to the folder, label -1. source = the folder's name.
    """
    _check_size(image_size)
    root = Path(path)
    files = _files(root, PICTURE_SUFFIXES)
    if csv_path is None:
        rows = [(f, f.relative_to(root).as_posix(), -1) for f in files]
    else:
        rows = _read_manifest(Path(csv_path), root)
        listed = {f.resolve() for f, _, _ in rows}
        unlisted = [f for f in files if f.resolve() not in listed]
        if unlisted:
            raise DataError(
                f"{len(unlisted)} images under {root} are not in {Path(csv_path).name}, "
                f"e.g. {unlisted[0].relative_to(root)}"
            )
    if not rows:
        raise DataError(f"{root}: no {'/'.join(PICTURE_SUFFIXES)} files")
    return ImageSet(
        images=torch.cat([_square_resize(_read_picture(f)[None], image_size) for f, _, _ in rows]),
        patient_ids=np.array([patient for _, patient, _ in rows]),
        labels=np.array([label for _, _, label in rows], dtype=np.int64),
        sources=np.full(len(rows), root.name or "folder"),
    )


def load_dicom_folder(
    path: str | Path,
    image_size: int,
    window: tuple[float, float] | None = None,
    unreadable: str = "skip",
    log: Callable[[str], None] = print,
) -> ImageSet:
    """Greyscale DICOM objects under path, recursively: *.dcm, *.dicom, and files of any other
    name that start like DICOM. A multi-frame object gives its middle frame (fedgen.data.dicom).

    Stored values pass RescaleSlope/Intercept, then a linear window: `window` = (centre, width)
    if given, else the file's first WindowCenter/WindowWidth, else the image's min..max.
    MONOCHROME1 is inverted so bone is bright. Patient id from PatientID (else the file stem),
    source from Manufacturer (else InstitutionName, else "dicom"), labels -1.

    Exports hold objects that are no grey image (colour, reports, structure sets, corrupt or
    undecodable files). unreadable="skip" leaves them out and logs one line counting them by
    cause; "error" raises DataError at the first, naming it and the cause. A folder with no
    usable image is a DataError either way.
    """
    _check_size(image_size)
    if unreadable not in UNREADABLE:
        raise DataError(f"unreadable must be one of {UNREADABLE}, got {unreadable!r}")
    root = Path(path)
    files = [f for f in _files(root, None) if is_dicom_file(f)]
    if not files:
        raise DataError(f"{root}: no {'/'.join(DICOM_SUFFIXES)} or other DICOM files")
    read = []
    skipped: dict[str, tuple[int, UnusableDicom]] = {}  # cause: (count, the first such error)
    for file in files:
        try:
            read.append(read_dicom(file, window))
        except UnusableDicom as err:
            if unreadable == "error":
                raise
            count, first = skipped.get(err.cause, (0, err))
            skipped[err.cause] = (count + 1, first)
    causes = sorted(skipped.items(), key=lambda item: -item[1][0])
    if not read:
        reasons = "; ".join(f"{n} {cause} (e.g. {first})" for cause, (n, first) in causes)
        raise DataError(f"{root}: none of {len(files)} DICOM files is a usable image: {reasons}")
    if skipped:
        counts = ", ".join(f"{n} {cause}" for cause, (n, _) in causes)
        log(f"{root}: skipped {len(files) - len(read)} of {len(files)} DICOM files: {counts}")
    return ImageSet(
        images=torch.cat([_square_resize(pixels[None], image_size) for pixels, _, _ in read]),
        patient_ids=np.array([patient for _, patient, _ in read]),
        labels=np.full(len(read), -1, dtype=np.int64),
        sources=np.array([source for _, _, source in read]),
    )


LOADERS: dict[str, Callable[..., ImageSet]] = {
    "medmnist": load_medmnist,
    "folder": load_image_folder,
    "dicom": load_dicom_folder,
}


def load_images(source: str, path: str | Path, image_size: int, **kw) -> ImageSet:
    """Load with the registered loader for `source` ("medmnist", "folder", "dicom")."""
    if source not in LOADERS:
        raise DataError(f"unknown image source {source!r}; known: {sorted(LOADERS)}")
    return LOADERS[source](path, image_size, **kw)
