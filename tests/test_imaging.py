"""imaging: real radiographs in every transfer syntax ingest accepts -> model pixels, bone white.

The sample files are decoded once per module (the 2000x2000 JPEG 2000 ones are the slow part);
variants in other transfer syntaxes are made in tmp from the small 440x440 chest so they stay fast.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from cxr_node.imaging import (
    Candidate,
    ImagingError,
    ModelImage,
    View,
    prepare,
    select_images,
    view_of,
)

MAX_SIDE = 512

# Stored (rows, columns) of the sample files (tests/samples.py says what each is).
CHEST_PA = {
    "CR-MONO1-10-chest.dcm": (440, 414),  # no File Meta header, implicit VR LE, MONOCHROME1
    "RG1_J2KI.dcm": (1955, 1841),  # JPEG 2000 lossy, MONOCHROME1
    "RG1_JLSN.dcm": (1955, 1841),  # JPEG-LS near-lossless, MONOCHROME1
    "RG1_DX_J2KR.dcm": (1955, 1841),  # JPEG 2000 lossless, MONOCHROME1 + Presentation LUT INVERSE
}
OTHER_DECODABLE = {
    "RG3_MONO2_JPLL.dcm": (1760, 1760),  # lower leg, JPEG lossless SV1, MONOCHROME2
    "RG3_J2KR.dcm": (1760, 1760),  # tibia, JPEG 2000 lossless, MONOCHROME1
    # a dog's lateral thorax, explicit VR LE, MONOCHROME1 + Presentation LUT INVERSE
    "highdicom_dx_image.dcm": (169, 211),
}
DECODABLE = CHEST_PA | OTHER_DECODABLE
SMALL_CHEST = "CR-MONO1-10-chest.dcm"
DOG_LATERAL = "highdicom_dx_image.dcm"
BROKEN = "RG1_DX_J2KR_broken.dcm"


@pytest.fixture(scope="module")
def prepared(cxr_dir: Path) -> dict[str, np.ndarray]:
    return {name: prepare(cxr_dir / name, MAX_SIDE) for name in DECODABLE}


@pytest.fixture(scope="module")
def small_chest_part10(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small chest as a Part-10 file (the original has no File Meta): the variants' source."""
    ds = pydicom.dcmread(cxr_dir / SMALL_CHEST, force=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path_factory.mktemp("variants") / "small-chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


# --- decoding the real files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DECODABLE))
def test_every_sample_decodes_to_uint8_within_size_keeping_aspect(
    prepared: dict[str, np.ndarray], name: str
) -> None:
    rows, columns = DECODABLE[name]
    pixels = prepared[name]
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    assert max(pixels.shape) == min(MAX_SIDE, max(rows, columns))
    assert pixels.shape[0] / pixels.shape[1] == pytest.approx(rows / columns, abs=0.01)
    assert pixels.std() > 20, "the picture should have contrast, not be a flat grey"


def test_small_images_are_never_enlarged(cxr_dir: Path) -> None:
    assert prepare(cxr_dir / SMALL_CHEST, 4096).shape == CHEST_PA[SMALL_CHEST]


@pytest.mark.parametrize("name", sorted(CHEST_PA))
def test_bone_is_white_mediastinum_brighter_than_both_lungs(
    prepared: dict[str, np.ndarray], name: str
) -> None:
    """On a PA chest the spine/mediastinum strip is denser than the lung fields either side.

    Medians over vertical strips of the upper-middle chest: robust to ribs and nodules.
    """
    pixels = prepared[name]
    rows, columns = pixels.shape
    band = slice(int(rows * 0.25), int(rows * 0.6))

    def strip(start: float, stop: float) -> float:
        return float(np.median(pixels[band, int(columns * start) : int(columns * stop)]))

    mediastinum = strip(0.45, 0.55)
    right_lung, left_lung = strip(0.2, 0.35), strip(0.65, 0.8)
    assert mediastinum > max(right_lung, left_lung) + 10, (mediastinum, right_lung, left_lung)


def test_lateral_dog_thorax_monochrome1_inverse_is_inverted_once(
    prepared: dict[str, np.ndarray],
) -> None:
    """MONOCHROME1 + Presentation LUT INVERSE is one inversion: the air above the back is black."""
    pixels = prepared[DOG_LATERAL]
    air = pixels[: pixels.shape[0] // 20]
    assert np.median(air) < 30
    assert np.median(pixels) > np.median(air) + 50


def test_monochrome2_copy_gives_the_same_picture(
    cxr_dir: Path, tmp_path: Path, prepared: dict[str, np.ndarray]
) -> None:
    """RG1 with inverted stored values, written as MONOCHROME2 with the mirrored window."""
    ds = pydicom.dcmread(cxr_dir / "RG1_J2KI.dcm")
    top = 2**ds.BitsStored - 1
    ds.set_pixel_data((top - ds.pixel_array).astype(np.uint16), "MONOCHROME2", ds.BitsStored)
    # Mirror x -> top - x maps the LINEAR window (c - 0.5 +- (w - 1) / 2) onto centre top - c + 1.
    ds.WindowCenter = top - float(ds.WindowCenter) + 1
    path = tmp_path / "rg1-monochrome2.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    monochrome2 = prepare(path, MAX_SIDE)
    monochrome1 = prepared["RG1_J2KI.dcm"]
    assert monochrome2.shape == monochrome1.shape
    assert correlation(monochrome1, monochrome2) > 0.999
    assert np.abs(monochrome1.astype(int) - monochrome2.astype(int)).max() <= 1


# --- every transfer syntax ingest accepts, made from the small chest ------------------------------


def _with_pydicom(transfer_syntax: UID, **options: Any) -> Callable[[Path, Path], None]:
    def encode(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = transfer_syntax  # deflate is applied when writing
        else:
            ds.compress(transfer_syntax, **options)
        ds.save_as(target, enforce_file_format=True)

    return encode


def _with_dcmtk(*command: str) -> Callable[[Path, Path], None]:
    def encode(source: Path, target: Path) -> None:
        if shutil.which(command[0]) is None:
            pytest.skip(f"{command[0]} (dcmtk) is not installed; .ci/run installs it")
        subprocess.run(
            [*command, str(source), str(target)], check=True, capture_output=True, timeout=60
        )

    return encode


# (encoder, transfer syntax UID the file must carry, lossless?)
VARIANTS = {
    "rle": (_with_pydicom(RLELossless, encoding_plugin="pydicom"), RLELossless, True),
    "deflate": (
        _with_pydicom(DeflatedExplicitVRLittleEndian),
        DeflatedExplicitVRLittleEndian,
        True,
    ),
    "j2k-lossless": (_with_pydicom(JPEG2000Lossless), JPEG2000Lossless, True),
    "j2k-lossy": (_with_pydicom(JPEG2000, j2k_cr=[20]), JPEG2000, False),
    "jpeg-baseline": (_with_dcmtk("/usr/bin/dcmcjpeg", "+eb"), JPEGBaseline8Bit, False),
    "jpeg-extended": (_with_dcmtk("/usr/bin/dcmcjpeg", "+ee"), JPEGExtended12Bit, False),
    "jpeg-lossless-p14": (_with_dcmtk("/usr/bin/dcmcjpeg", "+el"), JPEGLossless, True),
    "jpeg-lossless-sv1": (_with_dcmtk("/usr/bin/dcmcjpeg", "+e1"), JPEGLosslessSV1, True),
    "jpeg-ls-lossless": (_with_dcmtk("/usr/bin/dcmcjpls", "+el"), JPEGLSLossless, True),
    "jpeg-ls-near-lossless": (_with_dcmtk("/usr/bin/dcmcjpls", "+en"), JPEGLSNearLossless, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transfer_syntax_variants_decode_like_the_uncompressed_file(
    variant: str, small_chest_part10: Path, tmp_path: Path
) -> None:
    encode, syntax, lossless = VARIANTS[variant]
    path = tmp_path / f"{variant}.dcm"
    encode(small_chest_part10, path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    reference = prepare(small_chest_part10, MAX_SIDE)
    pixels = prepare(path, MAX_SIDE)
    if lossless:
        np.testing.assert_array_equal(pixels, reference)
    else:
        assert pixels.shape == reference.shape
        assert correlation(pixels, reference) > 0.995


# --- what cannot be used --------------------------------------------------------------------------


def test_corrupt_codestream_raises_imaging_error_with_reason(cxr_dir: Path) -> None:
    with pytest.raises(ImagingError, match=r"pixel data cannot be decoded \(JPEG 2000") as caught:
        prepare(cxr_dir / BROKEN, MAX_SIDE)
    assert "\n" not in str(caught.value), "a reason is one line, fit for a log field"


def test_truncated_native_pixel_data_raises_imaging_error(cxr_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.dcm"
    path.write_bytes((cxr_dir / DOG_LATERAL).read_bytes()[:-5000])
    assert "PixelData" in pydicom.dcmread(path), "pydicom reads the cut file without complaint"
    with pytest.raises(ImagingError, match=r"pixel data cannot be decoded.*less than expected"):
        prepare(path, MAX_SIDE)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # expected: it is cut
def test_truncated_compressed_pixel_data_raises_imaging_error(
    cxr_dir: Path, tmp_path: Path
) -> None:
    data = (cxr_dir / "RG1_J2KI.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImagingError, match="no Pixel Data"):
        prepare(path, MAX_SIDE)


@pytest.mark.parametrize(
    "content",
    [b"", b"MSH|^~\\&|not a DICOM file\r" * 20, bytes(range(256)) * 40],
    ids=["empty", "hl7", "binary"],
)
def test_non_dicom_file_raises_imaging_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-dicom.dcm"
    path.write_bytes(content)
    with pytest.raises(ImagingError):
        prepare(path, MAX_SIDE)


def test_missing_file_raises_imaging_error(tmp_path: Path) -> None:
    with pytest.raises(ImagingError, match="not readable as DICOM"):
        prepare(tmp_path / "gone.dcm", MAX_SIDE)


def _synthetic(
    path: Path, pixels: np.ndarray, photometric: str, bits_stored: int, **attributes: object
) -> Path:
    """A DX file built from scratch, for header cases the sample data does not have."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 64, columns: int = 64, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, columns).round().astype(np.uint16), (rows, 1))


def test_colour_image_raises_imaging_error(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    path = _synthetic(tmp_path / "rgb.dcm", rgb, "RGB", 8)
    with pytest.raises(ImagingError, match=r"colour image \(Samples per Pixel 3\)"):
        prepare(path, MAX_SIDE)


def test_multi_frame_image_raises_imaging_error(tmp_path: Path) -> None:
    frames = np.stack([ramp(), ramp()])
    path = _synthetic(tmp_path / "frames.dcm", frames, "MONOCHROME2", 12)
    with pytest.raises(ImagingError, match=r"multi-frame image \(2 frames\)"):
        prepare(path, MAX_SIDE)


def test_blank_image_raises_imaging_error(tmp_path: Path) -> None:
    path = _synthetic(
        tmp_path / "blank.dcm", np.full((32, 32), 7, dtype=np.uint16), "MONOCHROME2", 12
    )
    with pytest.raises(ImagingError, match="blank image"):
        prepare(path, MAX_SIDE)


def test_max_side_must_be_positive(cxr_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_side"):
        prepare(cxr_dir / SMALL_CHEST, 0)


# --- grey-level transforms on known values --------------------------------------------------------


def test_window_center_width_maps_its_range_to_black_white(tmp_path: Path) -> None:
    path = _synthetic(
        tmp_path / "window.dcm",
        ramp(),
        "MONOCHROME2",
        12,
        WindowCenter=[1024, 3000],
        WindowWidth=[1024, 100],
    )
    row = prepare(path, MAX_SIDE)[0].astype(int)
    values = ramp()[0].astype(float)
    expected = np.clip((values - 1023.5) / 1023 + 0.5, 0, 1) * 255  # first window, LINEAR
    assert np.abs(row - expected).max() <= 1


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    path = _synthetic(
        tmp_path / "rescale.dcm",
        ramp(),
        "MONOCHROME2",
        12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1000,
        WindowWidth=2000,
    )
    row = prepare(path, MAX_SIDE)[0].astype(int)
    values = ramp()[0].astype(float) * 2 - 1000
    expected = np.clip((values - 999.5) / 1999 + 0.5, 0, 1) * 255
    assert np.abs(row - expected).max() <= 1


def test_voi_lut_is_scaled_by_the_range_its_data_spans(tmp_path: Path) -> None:
    """A LUT that declares 16 bits but uses 12 (common in practice) still spans black..white."""
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 16])
    # A reversing curve that uses only 12 of the 16 bits it declares.
    lut.add_new("LUTData", "US", [4095 - v for v in range(4096)])
    path = _synthetic(
        tmp_path / "voi-lut.dcm",
        ramp(),
        "MONOCHROME2",
        12,
        VOILUTSequence=[lut],
        WindowCenter=100,
        WindowWidth=10,
    )
    row = prepare(path, MAX_SIDE)[0].astype(int)
    assert row[0] == 255 and row[-1] == 0, "the VOI LUT, not the window, is applied"
    assert np.all(np.diff(row) <= 0)


@pytest.mark.parametrize(
    ("border", "noise"),
    [(8, 300), (25, 0)],
    ids=["narrow-noisy-collimation", "wide-constant-shutter"],
)
def test_without_window_a_robust_window_ignores_the_collimated_border(
    tmp_path: Path, border: int, noise: int
) -> None:
    rng = np.random.default_rng(7)
    pixels = (3700 + rng.integers(0, noise + 1, (100, 100))).astype(np.uint16)  # unexposed: bright
    anatomy = slice(border, 100 - border)
    width = 100 - 2 * border
    pixels[anatomy, anatomy] = np.tile(
        np.linspace(1000, 2000, width).round().astype(np.uint16), (width, 1)
    )
    path = _synthetic(tmp_path / "collimated.dcm", pixels, "MONOCHROME2", 12)
    inside = prepare(path, MAX_SIDE)[anatomy, anatomy]
    assert inside.min() <= 5 and inside.max() >= 250, "the anatomy gets the whole grey range"


def test_unusable_window_falls_back_to_the_robust_window(tmp_path: Path) -> None:
    path = _synthetic(
        tmp_path / "zero-width.dcm", ramp(), "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=0
    )
    row = prepare(path, MAX_SIDE)[0]
    assert row[0] == 0 and row[-1] == 255


def test_monochrome2_with_presentation_lut_inverse_is_inverted(tmp_path: Path) -> None:
    path = _synthetic(
        tmp_path / "inverse.dcm", ramp(), "MONOCHROME2", 12, PresentationLUTShape="INVERSE"
    )
    row = prepare(path, MAX_SIDE)[0]
    assert row[0] == 255 and row[-1] == 0


# --- views ----------------------------------------------------------------------------------------


REAL_VIEWS = {
    "RG1_DX_J2KR.dcm": View.PA,
    "CR-MONO1-10-chest.dcm": View.PA,
    "RG1_J2KI.dcm": View.PA,
    "RG3_J2KR.dcm": View.AP,
    "RG3_MONO2_JPLL.dcm": View.UNKNOWN,  # View Position blank
    "highdicom_dx_image.dcm": View.UNKNOWN,  # a lateral, but the header does not say so
}


@pytest.mark.parametrize("name", sorted(REAL_VIEWS))
def test_view_of_real_headers(cxr_dir: Path, name: str) -> None:
    header = pydicom.dcmread(cxr_dir / name, force=True, stop_before_pixels=True)
    assert view_of(header) is REAL_VIEWS[name]


@pytest.mark.parametrize(
    ("position", "view"),
    [
        ("PA", View.PA),
        ("ap", View.AP),
        (" AP ", View.AP),
        ("LL", View.LATERAL),
        ("RL", View.LATERAL),
        ("LATERAL", View.LATERAL),
        ("LAT", View.LATERAL),
        ("LARGE LATERAL", View.LATERAL),
        ("XTABLE LATERAL", View.LATERAL),
        ("AP LLD", View.AP),
        ("LLD", View.UNKNOWN),
        ("LAO", View.UNKNOWN),
        ("PA OBLIQUE", View.UNKNOWN),
        ("PA/AP", View.UNKNOWN),
        ("", View.UNKNOWN),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # vendor spellings, on purpose
def test_view_of_view_position_variants(position: str, view: View) -> None:
    ds = Dataset()
    ds.ViewPosition = position
    assert view_of(ds) is view


def _coded(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    ("code", "view"),
    [
        (("SCT", "272479007", "postero-anterior"), View.PA),
        (("SCT", "399348003", "antero-posterior"), View.AP),
        (("SCT", "399173006", "left lateral"), View.LATERAL),
        (("SRT", "R-10232", "right lateral"), View.LATERAL),
        (("SNM3", "R-10214", "postero-anterior"), View.PA),  # as in the IU X-ray headers
        (("SCT", "399182000", "oblique"), View.UNKNOWN),
    ],
)
def test_view_of_view_code_sequence_when_view_position_is_blank(
    code: tuple[str, str, str], view: View
) -> None:
    ds = Dataset()
    ds.ViewPosition = ""
    ds.ViewCodeSequence = [_coded(*code)]
    assert view_of(ds) is view


def test_view_position_wins_over_view_code_and_nothing_is_unknown() -> None:
    ds = Dataset()
    ds.ViewPosition = "AP"
    ds.ViewCodeSequence = [_coded("SCT", "272479007", "postero-anterior")]
    assert view_of(ds) is View.AP
    assert view_of(Dataset()) is View.UNKNOWN
    assert View.PA.is_frontal and View.AP.is_frontal
    assert not View.LATERAL.is_frontal and not View.UNKNOWN.is_frontal


# --- choosing images ------------------------------------------------------------------------------


def candidate(uid: str, path: Path, view: View, number: int | None = None) -> Candidate:
    return Candidate(sop_instance_uid=uid, path=path, view=view, instance_number=number)


def test_pa_preferred_over_ap_and_lateral_follows(cxr_dir: Path) -> None:
    chest, dog = cxr_dir / SMALL_CHEST, cxr_dir / DOG_LATERAL
    candidates = [
        candidate("1.2.3.1", dog, View.LATERAL, 3),
        candidate("1.2.3.2", chest, View.AP, 9),
        candidate("1.2.3.3", chest, View.PA, 1),
    ]
    selection = select_images(candidates, MAX_SIDE)
    assert [(image.sop_instance_uid, image.view) for image in selection.images] == [
        ("1.2.3.3", View.PA),
        ("1.2.3.1", View.LATERAL),
    ]
    assert selection.dropped == [
        ("1.2.3.2", "AP image not used: a PA image is preferred as the frontal")
    ]
    assert all(
        image.pixels.dtype == np.uint8 and max(image.pixels.shape) <= MAX_SIDE
        for image in selection.images
    )


def test_repeat_exposure_is_chosen_whatever_the_order(cxr_dir: Path) -> None:
    chest = cxr_dir / SMALL_CHEST
    candidates = [candidate("1.2.3.7", chest, View.PA, 4), candidate("1.2.3.8", chest, View.PA, 5)]
    for ordering in (candidates, candidates[::-1]):
        selection = select_images(ordering, MAX_SIDE)
        assert [image.sop_instance_uid for image in selection.images] == ["1.2.3.8"]
        assert selection.dropped == [
            ("1.2.3.7", "second PA image; using the repeat exposure (instance 5)")
        ]


def test_same_instance_number_is_broken_by_uid_deterministically(cxr_dir: Path) -> None:
    chest = cxr_dir / SMALL_CHEST
    candidates = [candidate("1.2.3.1", chest, View.PA), candidate("1.2.3.2", chest, View.PA)]
    chosen = {
        select_images(ordering, MAX_SIDE).images[0].sop_instance_uid
        for ordering in (candidates, candidates[::-1])
    }
    assert len(chosen) == 1


def test_one_image_model_drops_the_lateral_with_a_reason(cxr_dir: Path) -> None:
    candidates = [
        candidate("1.2.3.1", cxr_dir / SMALL_CHEST, View.PA, 1),
        candidate("1.2.3.2", cxr_dir / DOG_LATERAL, View.LATERAL, 2),
    ]
    selection = select_images(candidates, MAX_SIDE, max_images=1)
    assert [image.view for image in selection.images] == [View.PA]
    assert selection.dropped == [("1.2.3.2", "lateral not used: model takes 1 image")]


def test_broken_preferred_frontal_falls_back_to_the_next(cxr_dir: Path) -> None:
    candidates = [
        candidate("1.2.3.1", cxr_dir / BROKEN, View.PA, 2),  # preferred: the repeat exposure
        candidate("1.2.3.2", cxr_dir / SMALL_CHEST, View.PA, 1),
        candidate("1.2.3.3", cxr_dir / SMALL_CHEST, View.UNKNOWN, 7),
    ]
    selection = select_images(candidates, MAX_SIDE)
    assert [image.sop_instance_uid for image in selection.images] == ["1.2.3.2"]
    dropped = dict(selection.dropped)
    assert set(dropped) == {"1.2.3.1", "1.2.3.3"}, "every unused candidate is accounted for"
    assert dropped["1.2.3.1"].startswith(
        "PA image could not be prepared: pixel data cannot be decoded"
    )
    assert (
        dropped["1.2.3.3"] == "unknown-view image not used: a PA image is preferred as the frontal"
    )


def test_broken_preferred_lateral_falls_back_to_the_next(cxr_dir: Path, tmp_path: Path) -> None:
    not_dicom = tmp_path / "not-dicom.dcm"
    not_dicom.write_bytes(b"plain text\n" * 50)
    candidates = [
        candidate("1.2.3.1", cxr_dir / SMALL_CHEST, View.PA, 1),
        candidate("1.2.3.2", not_dicom, View.LATERAL, 5),
        candidate("1.2.3.3", cxr_dir / DOG_LATERAL, View.LATERAL, 4),
    ]
    selection = select_images(candidates, MAX_SIDE)
    assert [image.sop_instance_uid for image in selection.images] == ["1.2.3.1", "1.2.3.3"]
    assert selection.dropped == [
        (
            "1.2.3.2",
            "lateral image could not be prepared: no Pixel Data: not an image, or the file "
            "is truncated",
        )
    ]


def test_unknown_view_is_the_frontal_only_when_there_is_no_pa_or_ap(
    cxr_dir: Path, tmp_path: Path
) -> None:
    not_dicom = tmp_path / "not-dicom.dcm"
    not_dicom.write_bytes(b"plain text\n" * 50)
    candidates = [
        candidate("1.2.3.1", not_dicom, View.AP, 1),
        candidate("1.2.3.2", cxr_dir / SMALL_CHEST, View.UNKNOWN, 1),
    ]
    selection = select_images(candidates, MAX_SIDE)
    assert [(image.sop_instance_uid, image.view) for image in selection.images] == [
        ("1.2.3.2", View.UNKNOWN)
    ]
    assert [uid for uid, _ in selection.dropped] == ["1.2.3.1"]


def test_no_usable_frontal_raises_with_every_reason(cxr_dir: Path, tmp_path: Path) -> None:
    not_dicom = tmp_path / "not-dicom.dcm"
    not_dicom.write_bytes(b"plain text\n" * 50)
    candidates = [
        candidate("1.2.3.1", cxr_dir / BROKEN, View.PA, 1),
        candidate("1.2.3.2", not_dicom, View.AP, 2),
        candidate("1.2.3.3", cxr_dir / DOG_LATERAL, View.LATERAL, 3),
    ]
    with pytest.raises(ImagingError) as caught:
        select_images(candidates, MAX_SIDE)
    reason = str(caught.value)
    assert reason.startswith(
        "no frontal image could be prepared: PA #1: pixel data cannot be decoded"
    )
    assert "AP #2: no Pixel Data" in reason


@pytest.mark.parametrize(
    ("views", "reason"),
    [
        ([], "the study has no images"),
        ([View.LATERAL], "no PA, AP or unknown-view image (only lateral)"),
    ],
)
def test_study_without_frontal_raises(cxr_dir: Path, views: list[View], reason: str) -> None:
    candidates = [
        candidate(f"1.2.3.{i}", cxr_dir / DOG_LATERAL, view) for i, view in enumerate(views)
    ]
    with pytest.raises(ImagingError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        select_images(candidates, MAX_SIDE)


def test_constructors_reject_bad_input(cxr_dir: Path) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        Candidate("", cxr_dir / SMALL_CHEST, View.PA)
    with pytest.raises(TypeError, match="path"):
        Candidate("1.2.3", str(cxr_dir / SMALL_CHEST), View.PA)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="view"):
        Candidate("1.2.3", cxr_dir / SMALL_CHEST, "PA")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instance_number"):
        Candidate("1.2.3", cxr_dir / SMALL_CHEST, View.PA, "3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instance_id"):
        Candidate("1.2.3", cxr_dir / SMALL_CHEST, View.PA, 3, 0)
    with pytest.raises(ValueError, match="2-D uint8"):
        ModelImage("1.2.3", View.PA, np.zeros((2, 2, 3), dtype=np.uint8))
    chest = cxr_dir / SMALL_CHEST
    with pytest.raises(ValueError, match="more than once"):
        select_images(
            [candidate("1.2.3", chest, View.PA), candidate("1.2.3", chest, View.AP)], MAX_SIDE
        )
    with pytest.raises(ValueError, match="max_images"):
        select_images([candidate("1.2.3", chest, View.PA)], MAX_SIDE, max_images=0)
