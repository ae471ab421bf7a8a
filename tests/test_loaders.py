"""The real-data loaders, on small files written here: values, ids, labels, and corrupt input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedgen.config import ConfigError, DataConfig, compose, to_config
from fedgen.data.dataset import DataError
from fedgen.data.loaders import (
    LOADERS,
    load_dicom_folder,
    load_image_folder,
    load_images,
    load_medmnist,
)
from fedgen.data.silos import load_pool

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, **overrides) -> Path:
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def write_dicom(path: Path, stored: np.ndarray, photometric="MONOCHROME2", **elements) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = len(stored)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --- MedMNIST ---------------------------------------------------------------------------


def test_medmnist_grey_fixed_scaling_ids_and_sources(tmp_path):
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 51, 255)])
    images[2, :, :14] = 0  # half black, half white: per-image min/max scaling would not show
    path = write_npz(tmp_path / "pneumoniamnist.npz", images, np.array([[0], [1], [1]]))
    data = load_medmnist(path, image_size=28)
    assert data.images.shape == (9, 1, 28, 28)
    assert torch.allclose(data.images[0], torch.tensor(-1.0))
    assert torch.allclose(data.images[1], torch.tensor(51 / 127.5 - 1))  # -0.6, not rescaled
    assert data.images[2, 0, 0, 0] == -1.0 and data.images[2, 0, 0, -1] == 1.0
    assert list(data.labels) == [0, 1, 1] * 3
    assert list(data.patient_ids[2:4]) == ["train-000002", "val-000000"]
    assert list(np.unique(data.sources)) == ["medmnist-test", "medmnist-train", "medmnist-val"]
    only_test = load_medmnist(path, image_size=28, splits=("test",))
    assert len(only_test) == 3 and set(only_test.sources) == {"medmnist-test"}


def test_medmnist_resizes_rgb_to_grey_and_multi_label_to_any(tmp_path):
    red = np.zeros((2, 28, 28, 3), np.uint8)
    red[..., 0] = 255
    labels = np.array([[0, 0, 1], [0, 0, 0]])
    data = load_medmnist(write_npz(tmp_path / "m.npz", red, labels), image_size=32)
    assert data.images.shape == (6, 1, 32, 32)
    assert torch.allclose(data.images, torch.tensor(0.299 * 255 / 127.5 - 1), atol=1e-4)
    assert list(data.labels[:2]) == [1, 0]


def test_medmnist_corrupt_files_name_the_file(tmp_path):
    good = np.zeros((2, 28, 28), np.uint8)
    labels = np.zeros((2, 1))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="garbage.npz"):
        load_medmnist(garbage, 32)
    path = tmp_path / "nokey.npz"
    np.savez(path, train_images=good, train_labels=labels)
    with pytest.raises(DataError, match="nokey.npz.*val_images"):
        load_medmnist(path, 32)
    volumes = write_npz(tmp_path / "volumes.npz", np.zeros((2, 28, 28, 28), np.uint8), labels)
    with pytest.raises(DataError, match="volumes.npz.*shape"):
        load_medmnist(volumes, 32)
    floats = write_npz(tmp_path / "floats.npz", good.astype(np.float32), labels)
    with pytest.raises(DataError, match="floats.npz.*uint8"):
        load_medmnist(floats, 32)
    short = write_npz(tmp_path / "short.npz", good, np.zeros((3, 1)))
    with pytest.raises(DataError, match="short.npz.*labels"):
        load_medmnist(short, 32)
    with pytest.raises(DataError, match="missing.npz"):
        load_medmnist(tmp_path / "missing.npz", 32)


# --- PNG / JPEG folders -------------------------------------------------------------------


def test_png_folder_with_csv_8_and_16_bit(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.full((32, 32), 0, np.uint8)).save(tmp_path / "imgs" / "b.png")
    sixteen = np.full((32, 32), 65535, np.uint16)
    sixteen[:, 16:] = 16384
    Image.fromarray(sixteen).save(tmp_path / "imgs" / "sub" / "c.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,patient_id,label\nsub/c.png,P2,\na.png,P1,1\nb.png,P1,0\n")
    data = load_image_folder(tmp_path / "imgs", 32, csv_path=csv_path)
    assert list(data.patient_ids) == ["P2", "P1", "P1"]  # the CSV's order
    assert list(data.labels) == [-1, 1, 0]
    assert data.images[1].eq(1.0).all() and data.images[2].eq(-1.0).all()
    # 16-bit scales by 65535, not by 255 (which would saturate) nor by the image's own max.
    assert data.images[0, 0, 0, 0] == 1.0
    assert data.images[0, 0, 0, -1] == pytest.approx(16384 / 65535 * 2 - 1, abs=1e-6)
    assert set(data.sources) == {"imgs"}


def test_folder_without_csv_crops_resizes_and_reads_jpeg(tmp_path):
    wide = np.zeros((40, 60), np.uint8)
    wide[:, :10] = wide[:, 50:] = 255  # outside the centre square: cropped away
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(tmp_path / "grey.jpg", quality=95)
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "green.jpeg", quality=95)
    data = load_image_folder(tmp_path, 16)
    assert data.images.shape == (3, 1, 16, 16)
    assert list(data.patient_ids) == ["green.jpeg", "grey.jpg", "wide.png"]  # sorted
    assert list(data.labels) == [-1, -1, -1]
    assert data.images.min() >= -1 and data.images.max() <= 1
    green = 0.587 * 255 / 127.5 - 1
    assert data.images[0].mean().item() == pytest.approx(green, abs=0.03)
    assert data.images[1].mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.03)
    assert torch.allclose(data.images[2], torch.tensor(-1.0))  # the bright margins were cropped


def test_folder_corrupt_cases_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        load_image_folder(tmp_path, 32)
    truncated.unlink()

    missing = tmp_path / "missing.csv"
    missing.write_text("file,patient_id,label\ngood.png,P1,0\nghost.png,P2,1\n")
    with pytest.raises(DataError, match="ghost.png"):
        load_image_folder(tmp_path, 32, csv_path=missing)
    unlisted = tmp_path / "unlisted.csv"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "extra.png")
    unlisted.write_text("file,patient_id\ngood.png,P1\n")
    with pytest.raises(DataError, match="extra.png"):
        load_image_folder(tmp_path, 32, csv_path=unlisted)
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text("file,patient_id,label\ngood.png,P1,yes\nextra.png,P2,\n")
    with pytest.raises(DataError, match="bad_label.csv line 2.*good.png"):
        load_image_folder(tmp_path, 32, csv_path=bad_label)
    no_column = tmp_path / "no_column.csv"
    no_column.write_text("file,label\ngood.png,1\n")
    with pytest.raises(DataError, match="no_column.csv.*patient_id"):
        load_image_folder(tmp_path, 32, csv_path=no_column)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        load_image_folder(empty, 32)


# --- DICOM ----------------------------------------------------------------------------


def stored_blocks() -> np.ndarray:
    """Stored values 50, 75, 100, 150 in four column blocks: with slope 2 and intercept -100
    they are 0, 50, 100, 200 in modality units; window centre 100, width 200 maps them to
    -1, -0.5, 0, 1."""
    stored = np.zeros((32, 32), np.uint16)
    for i, value in enumerate((50, 75, 100, 150)):
        stored[:, 8 * i : 8 * i + 8] = value
    return stored


def test_dicom_rescale_window_and_monochrome1_inversion(tmp_path):
    common = dict(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=100, WindowWidth=200)
    write_dicom(tmp_path / "a.dcm", stored_blocks(), "MONOCHROME2", PatientID="P7",
                Manufacturer="AcmeRad", **common)  # fmt: skip
    write_dicom(tmp_path / "b.dcm", stored_blocks(), "MONOCHROME1", PatientID="P7",
                InstitutionName="St Elsewhere", **common)  # fmt: skip
    data = load_dicom_folder(tmp_path, 32)
    expected = torch.tensor([-1.0, -0.5, 0.0, 1.0]).repeat_interleave(8).expand(32, 32)
    assert torch.allclose(data.images[0, 0], expected)
    assert torch.allclose(data.images[1, 0], -expected)  # MONOCHROME1: low values are white
    assert list(data.patient_ids) == ["P7", "P7"]
    assert list(data.sources) == ["AcmeRad", "St Elsewhere"]
    assert list(data.labels) == [-1, -1]

    # An explicit window overrides the file's: centre 50, width 100 -> 0 and 50 span it.
    narrow = load_dicom_folder(tmp_path, 32, window=(50.0, 100.0))
    assert torch.allclose(narrow.images[0, 0, 0, ::8], torch.tensor([-1.0, 0.0, 1.0, 1.0]))


def test_dicom_without_window_uses_min_max_and_falls_back_for_ids(tmp_path):
    stored = np.zeros((48, 64), np.uint16)
    stored[:, 32:] = 1000
    write_dicom(tmp_path / "scan01.dcm", stored)
    data = load_images("dicom", tmp_path, 16)
    assert data.images.shape == (1, 1, 16, 16)
    assert data.images[0, 0, :, 0].eq(-1).all() and data.images[0, 0, :, -1].eq(1).all()
    assert data.patient_ids[0] == "scan01" and data.sources[0] == "dicom"


def test_dicom_corrupt_cases_name_the_file(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\x00garbage" * 40)
    with pytest.raises(DataError, match="junk.dcm"):
        load_dicom_folder(tmp_path, 32)
    (tmp_path / "junk.dcm").unlink()
    path = write_dicom(tmp_path / "nopixels.dcm", stored_blocks())
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="nopixels.dcm"):
        load_dicom_folder(tmp_path, 32)
    path.unlink()
    write_dicom(tmp_path / "zero_width.dcm", stored_blocks(), WindowCenter=10, WindowWidth=0)
    with pytest.raises(DataError, match="zero_width.dcm.*width"):
        load_dicom_folder(tmp_path, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dicom_folder(tmp_path / "empty", 32)


# --- pydicom's own test files: what hospital exports hold ----------------------------------

# Files in pydicom's wheel that a hospital export might hold, and why each is here.
USABLE = {
    "CT_small.dcm": "plain little endian",
    "MR_small.dcm": "the uncompressed original of the MR_small_* files",
    "MR_small_bigendian.dcm": "explicit VR big endian",
    "image_dfl.dcm": "deflated",
    "JPEG-lossy.dcm": "12-bit JPEG extended, as NEMA wrote it (SOS header off-standard)",
    "JPGExtended.dcm": "the same JPEG with its header fixed",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "MR_small_RLE.dcm": "RLE lossless",
    "rtdose.dcm": "15 frames",
    "dicomdirtests/77654033/CR1/6154": "MONOCHROME1, named without a suffix as on DICOMDIR media",
}
UNUSABLE = {  # name: the cause the loader gives
    "ExplVR_BigEnd.dcm": "colour",  # RGB
    "SC_rgb_jpeg_dcmtk.dcm": "colour",  # YBR_FULL, JPEG baseline
    "examples_palette.dcm": "colour",  # palette
    "rtplan.dcm": "no pixel data",
    "test-SR.dcm": "no pixel data",
    "MR_truncated.dcm": "corrupt",  # pixel data cut short
}


def pydicom_export(folder: Path) -> Path:
    """USABLE and UNUSABLE copied flat from pydicom's wheel, read offline (download=False:
    pydicom fetches its larger test files from GitHub, which may be out of reach); skips the
    test if this pydicom ships without them."""
    folder.mkdir()
    for name in [*USABLE, *UNUSABLE]:
        found = get_testdata_file(name, download=False)
        if found is None:
            pytest.skip(f"pydicom ships without its test file {name}")
        (folder / Path(name).name).write_bytes(Path(found).read_bytes())
    (folder / "README").write_text("not DICOM, no suffix: not a candidate, not counted")
    return folder


def image_of(data, name: str) -> torch.Tensor:
    """The image [S, S] loaded from file `name`: usable files load in sorted order."""
    return data.images[sorted(Path(n).name for n in USABLE).index(name), 0]


def test_pydicom_export_skips_unusable_files_and_counts_them_by_cause(tmp_path, capsys):
    folder = pydicom_export(tmp_path / "export")
    data = load_dicom_folder(folder, 32)
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary == [f"{folder}: skipped 6 of 17 DICOM files: "
                       "3 colour, 2 no pixel data, 1 corrupt"]  # fmt: skip
    assert data.images.shape == (len(USABLE), 1, 32, 32)
    assert data.images.isfinite().all() and data.images.abs().max() <= 1.0
    original = image_of(data, "MR_small.dcm")
    assert original.std() > 0.1  # an image, not a constant
    for lossless in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                     "MR_small_RLE.dcm", "MR_small_bigendian.dcm"):  # fmt: skip
        assert torch.equal(image_of(data, lossless), original), lossless
    fixed = image_of(data, "JPGExtended.dcm")
    assert fixed.std() > 0.1
    assert torch.allclose(image_of(data, "JPEG-lossy.dcm"), fixed, atol=0.02)
    for other in ("CT_small.dcm", "image_dfl.dcm", "6154"):
        assert image_of(data, other).std() > 0.01, other


def test_pydicom_export_with_unreadable_error_stops_at_the_first(tmp_path):
    folder = pydicom_export(tmp_path / "export")
    with pytest.raises(DataError, match=r"ExplVR_BigEnd\.dcm: colour \(.*'RGB'"):
        load_dicom_folder(folder, 32, unreadable="error")
    with pytest.raises(DataError, match="unreadable"):
        load_dicom_folder(folder, 32, unreadable="ignore")
    # The setting, from conf/ through the config to the loader.
    cfg = to_config(compose(["data=dicom", f"data.path={folder}"]))
    assert cfg.data.unreadable == "skip"
    with pytest.raises(DataError, match="ExplVR_BigEnd.dcm"):
        load_pool(DataConfig(source="dicom", path=str(folder), unreadable="error"), 3)
    with pytest.raises(ConfigError, match="data.unreadable"):
        to_config(compose(["data=dicom", f"data.path={folder}", "data.unreadable=ignore"]))


def test_a_folder_without_a_usable_dicom_image_names_the_causes(tmp_path):
    folder = pydicom_export(tmp_path / "export")
    for file in folder.iterdir():
        if UNUSABLE.get(file.name) not in ("colour", "no pixel data"):
            file.unlink()
    with pytest.raises(DataError, match=f"{folder}: none of 5 .*: 3 colour .*; 2 no pixel data"):
        load_dicom_folder(folder, 32)


def test_multi_frame_gives_the_middle_frame_with_enhanced_rescale_and_windows(tmp_path):
    frames = np.stack([np.full((16, 16), 50 * i, np.uint16) for i in range(5)])  # 0 .. 200
    rescale, window = Dataset(), Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept = 2, 0  # stored 100 -> 200
    shared = Dataset()
    shared.PixelValueTransformationSequence = [rescale]
    per_frame = []
    for i in range(5):
        window = Dataset()
        window.WindowCenter, window.WindowWidth = (200, 400) if i == 2 else (0, 1)
        item = Dataset()
        item.FrameVOILUTSequence = [window]
        per_frame.append(item)
    write_dicom(tmp_path / "volume.dcm", frames, SharedFunctionalGroupsSequence=[shared],
                PerFrameFunctionalGroupsSequence=per_frame)  # fmt: skip
    data = load_dicom_folder(tmp_path, 16)
    assert len(data) == 1
    # Frame 2: stored 100, rescaled 200, its own window 200 +- 200: the middle grey, 0.
    assert torch.allclose(data.images[0], torch.tensor(0.0))
    # pydicom's 15-frame dose grid: one image, its middle frame, decoded alone.
    dose = get_testdata_file("rtdose.dcm", download=False)
    if dose is None:
        pytest.skip("pydicom ships without rtdose.dcm")
    (tmp_path / "volume.dcm").unlink()
    (tmp_path / "rtdose.dcm").write_bytes(Path(dose).read_bytes())
    middle = dcmread(dose).pixel_array[7].astype(np.float64)
    expected = (middle - middle.min()) / (middle.max() - middle.min()) * 2 - 1
    dose_image = load_dicom_folder(tmp_path, 10).images
    assert dose_image.shape == (1, 1, 10, 10)
    assert torch.allclose(dose_image[0, 0], torch.from_numpy(expected).float(), atol=1e-6)


# --- registry -------------------------------------------------------------------------------


def test_load_images_dispatches_through_the_registry(tmp_path):
    assert set(LOADERS) == {"medmnist", "folder", "dicom"}
    path = write_npz(tmp_path / "m.npz", np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1)))
    assert len(load_images("medmnist", path, 16, splits=("val",))) == 2
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    assert load_images("folder", tmp_path, 8).patient_ids[0] == "x.png"
    with pytest.raises(DataError, match="nifti"):
        load_images("nifti", tmp_path, 8)
