"""Stored chest X-ray DICOMs -> model-ready 8-bit grayscale images.

The node does all DICOM work so that a worker receives only pixels and a view name: this module
chooses which images of a study the model sees (one frontal, optionally one lateral), decodes them
whatever transfer syntax ingest accepted, and renders them the way a radiologist's viewer would
(modality LUT, VOI LUT or window, polarity) so that bone and dense tissue are white.

Every failure caused by the input (a corrupt codestream, a truncated file, a colour image) is an
`ImagingError` whose text an admin can act on and which names no patient: images are named by
their instance row id and view, never by file name or UID.

Before any decoder sees the pixel data, the header is checked against `limits` (Rows x Columns x
frames x samples, the decoded size) and so is the size the compressed codestream declares for
itself (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ): a few kilobytes that claim 16384 x 16384 pixels
are refused, not decoded. In the node the decoding itself runs in `cxr_node.decoder`'s child
process, under a memory and a time limit.
"""

from __future__ import annotations

import enum
import io
import math
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)
from structlog.contextvars import bound_contextvars

from cxr_node.config import LimitsConfig

log = structlog.get_logger(__name__)

DEFAULT_LIMITS = LimitsConfig()

# Percentiles of the robust window used when a file has no VOI LUT and no window: wide enough to
# keep lung detail, narrow enough that a few saturated pixels (markers, wires) do not flatten it.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)
# Fraction cut from each edge before measuring the robust window, so that the collimated border
# (blank, unexposed film) does not take a share of the grey levels.
COLLIMATION_MARGIN = 0.1
# Pixels the robust window's percentiles are taken from at most: a regular subsample of a larger
# image gives the same window, with a fraction of the memory.
ROBUST_WINDOW_SAMPLES = 4_000_000

# Compressed transfer syntaxes whose codestream declares its own size, by where it says so.
_JPEG_SYNTAXES = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes)
_JPEG2000_SYNTAXES = frozenset(JPEG2000TransferSyntaxes)
# Frame header markers: SOF0..SOF15 of ITU-T T.81 (C4, C8 and CC are other markers) and the
# JPEG-LS SOF55 of T.87.
_SOF_MARKERS = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7})
CODESTREAM_SCAN_BYTES = 1 << 20
"""How far into a codestream its frame header is looked for (it follows a few small segments)."""
MAX_DETAIL_CHARACTERS = 200
"""Longest text of a library's error message kept in a reason."""
MAX_LISTED_FAILURES = 5
"""Failed frontal candidates named one by one in a study's reason; the rest are counted."""

# (is implicit VR, is little endian) of a file without a File Meta header -> its transfer syntax.
_SYNTAX_OF_ENCODING: dict[tuple[bool | None, bool | None], UID] = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class ImagingError(Exception):
    """An image that cannot be used.

    str(exc) is one line an admin can act on; it never contains patient identifiers.
    """


class View(str, enum.Enum):
    """Projection of a chest radiograph, as far as the model cares."""

    PA = "PA"
    AP = "AP"
    LATERAL = "LATERAL"
    UNKNOWN = "UNKNOWN"

    @property
    def is_frontal(self) -> bool:
        return self in (View.PA, View.AP)


# How a view is named in reasons that admins read.
_LABELS = {View.PA: "PA", View.AP: "AP", View.LATERAL: "lateral", View.UNKNOWN: "unknown-view"}

# ViewPosition (0018,5101) words. Decubitus films are frontal projections ("AP LLD" -> AP);
# obliques are neither frontal nor lateral, so a word from _OBLIQUE makes the view UNKNOWN.
_VIEW_WORDS: dict[str, View] = {
    "PA": View.PA,
    "AP": View.AP,
    "LL": View.LATERAL,
    "RL": View.LATERAL,
    "LAT": View.LATERAL,
    "LATERAL": View.LATERAL,
}
_OBLIQUE = frozenset({"LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "OBL", "OBLIQUE"})

# ViewCodeSequence codes of PS3.16 CID 4010 "DX View": SNOMED CT, and the SNOMED RT codes older
# devices still send (designator SRT, or SNM3 on pre-2000 equipment).
_VIEW_CODES: dict[tuple[str, str], View] = {
    **{
        ("SCT", code): view
        for code, view in (
            ("272479007", View.PA),  # postero-anterior
            ("399348003", View.AP),  # antero-posterior
            ("399173006", View.LATERAL),  # left lateral
            ("399198007", View.LATERAL),  # right lateral
            ("399067008", View.LATERAL),  # lateral
        )
    },
    **{
        (scheme, code): view
        for scheme in ("SRT", "SNM3")
        for code, view in (
            ("R-10214", View.PA),
            ("R-10206", View.AP),
            ("R-10236", View.LATERAL),
            ("R-10232", View.LATERAL),
            ("R-102CD", View.LATERAL),
        )
    },
}


def view_of(ds: Dataset) -> View:
    """The projection from the header alone (works on a stop_before_pixels read).

    View Position first, because every CR/DX device fills it; View Code Sequence when it is blank
    or says nothing usable; UNKNOWN otherwise.
    """
    position = _view_from_position(str(ds.get("ViewPosition", "") or ""))
    if position is not View.UNKNOWN:
        return position
    for item in ds.get("ViewCodeSequence", None) or ():
        scheme = str(item.get("CodingSchemeDesignator", "")).strip().upper()
        code = str(item.get("CodeValue", "")).strip().upper()
        if (scheme, code) in _VIEW_CODES:
            return _VIEW_CODES[(scheme, code)]
    return View.UNKNOWN


def _view_from_position(position: str) -> View:
    """Map vendor spellings ("PA", "LL", "LARGE LATERAL", "AP LLD", "XTABLE LATERAL") to a View."""
    words = set(re.split(r"[^A-Z]+", position.upper())) - {""}
    if words & _OBLIQUE:
        return View.UNKNOWN
    views = {_VIEW_WORDS[word] for word in words if word in _VIEW_WORDS}
    return views.pop() if len(views) == 1 else View.UNKNOWN


@dataclass(frozen=True)
class Candidate:
    """A stored instance of the study that could be shown to the model."""

    sop_instance_uid: str
    path: Path
    view: View
    instance_number: int | None = None
    instance_id: int | None = None
    """The stored copy's row id: how logs name this image (the UID and file name identify)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sop_instance_uid, str) or not self.sop_instance_uid.strip():
            raise ValueError(
                f"sop_instance_uid must be a non-empty string, got {self.sop_instance_uid!r}"
            )
        if not isinstance(self.path, Path):
            raise TypeError(f"path must be a pathlib.Path, got {type(self.path).__name__}")
        if not isinstance(self.view, View):
            raise TypeError(f"view must be a View, got {self.view!r}")
        if self.instance_number is not None and (
            not isinstance(self.instance_number, int) or isinstance(self.instance_number, bool)
        ):
            raise TypeError(f"instance_number must be an int or None, got {self.instance_number!r}")
        if self.instance_id is not None and (
            not isinstance(self.instance_id, int)
            or isinstance(self.instance_id, bool)
            or self.instance_id < 1
        ):
            raise TypeError(f"instance_id must be a positive int or None, got {self.instance_id!r}")

    @property
    def log_fields(self) -> dict[str, object]:
        """The non-identifying handle of this image in log events."""
        return {"instance": self.instance_id, "view": self.view.value}


@dataclass(frozen=True, eq=False)
class ModelImage:
    """One image as the worker receives it: pixels and the view, nothing that identifies anyone.

    Compared by identity: equality of an ndarray field has no single truth value.
    """

    sop_instance_uid: str
    view: View
    pixels: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.sop_instance_uid, str) or not self.sop_instance_uid.strip():
            raise ValueError(
                f"sop_instance_uid must be a non-empty string, got {self.sop_instance_uid!r}"
            )
        if not isinstance(self.view, View):
            raise TypeError(f"view must be a View, got {self.view!r}")
        _check_model_pixels(self.pixels)


@dataclass(frozen=True)
class Selection:
    """The images chosen for one study, and why every other candidate was left out."""

    images: list[ModelImage]
    dropped: list[tuple[str, str]]


Decode = Callable[[Path, int], np.ndarray]
"""How an image is turned into model pixels: `prepare`, or `DecoderProcess.prepare` in the node."""


def select_images(
    candidates: Sequence[Candidate],
    max_side: int,
    max_images: int = 2,
    decode: Decode | None = None,
) -> Selection:
    """Choose and prepare the frontal (and lateral) image of a study.

    Frontal preference is PA, then AP, then an image of unknown view; within a view the highest
    Instance Number wins, because a repeated exposure is taken when the first one was unusable.
    A candidate that fails to prepare is replaced by the next one of the same role. ``decode``
    defaults to `prepare` in this process.
    """
    _require_positive("max_side", max_side)
    _require_positive("max_images", max_images)
    uids = [candidate.sop_instance_uid for candidate in candidates]
    if len(set(uids)) != len(uids):
        raise ValueError("candidates name the same sop_instance_uid more than once")

    failures: dict[str, str] = {}
    frontal_order = [
        c for view in (View.PA, View.AP, View.UNKNOWN) for c in _ranked(candidates, view)
    ]
    decode = decode or prepare
    frontal = _first_usable(frontal_order, max_side, failures, decode)
    if frontal is None:
        raise ImagingError(_no_frontal_reason(candidates, frontal_order, failures))
    if frontal[1].view is View.UNKNOWN:
        log.warning(
            "imaging.frontal_view_unknown",
            **frontal[1].log_fields,
            reason="no PA or AP image could be used; an unknown-view image is sent as frontal",
        )
    chosen = [frontal]
    if max_images >= 2:
        lateral = _first_usable(_ranked(candidates, View.LATERAL), max_side, failures, decode)
        if lateral is not None:
            chosen.append(lateral)

    used = {candidate.sop_instance_uid: candidate for _, candidate in chosen}
    dropped: list[tuple[str, str]] = []
    for candidate in candidates:
        uid = candidate.sop_instance_uid
        if uid in used:
            continue
        if uid in failures:
            reason = f"{_label(candidate.view)} image could not be prepared: {failures[uid]}"
        else:
            reason = _unused_reason(candidate, [c for _, c in chosen], max_images)
        log.info("imaging.candidate_dropped", **candidate.log_fields, reason=reason)
        dropped.append((uid, reason))
    return Selection(images=[image for image, _ in chosen], dropped=dropped)


def _ranked(candidates: Sequence[Candidate], view: View) -> list[Candidate]:
    """Candidates of one view, preferred first: highest Instance Number, then highest UID.

    The UID order only has to be fixed, so that the same study always gives the same choice.
    """
    return sorted(
        (c for c in candidates if c.view is view),
        key=lambda c: (c.instance_number is not None, c.instance_number or 0, c.sop_instance_uid),
        reverse=True,
    )


def _first_usable(
    ordered: Sequence[Candidate], max_side: int, failures: dict[str, str], decode: Decode
) -> tuple[ModelImage, Candidate] | None:
    """Prepare candidates in order until one works; each failure's reason goes into `failures`."""
    for candidate in ordered:
        try:
            with bound_contextvars(**candidate.log_fields):  # names the image in decode's events
                pixels = decode(candidate.path, max_side)
        except ImagingError as exc:
            failures[candidate.sop_instance_uid] = str(exc)
            log.warning("imaging.prepare_failed", **candidate.log_fields, reason=str(exc))
            continue
        return ModelImage(candidate.sop_instance_uid, candidate.view, pixels), candidate
    return None


def _unused_reason(candidate: Candidate, chosen: Sequence[Candidate], max_images: int) -> str:
    """Why a candidate that was never tried is not sent: another image took its role."""
    if candidate.view is View.LATERAL and max_images < 2:
        return "lateral not used: model takes 1 image"
    frontal = chosen[0]
    rival = next((c for c in chosen if c.view is candidate.view), frontal)
    label = _label(candidate.view)
    if rival.view is not candidate.view:
        return f"{label} image not used: a {_label(rival.view)} image is preferred as the frontal"
    if rival.instance_number is not None and (
        candidate.instance_number is None or rival.instance_number > candidate.instance_number
    ):
        return f"second {label} image; using the repeat exposure (instance {rival.instance_number})"
    return f"second {label} image; no later exposure to tell them apart, chosen by UID order"


def _no_frontal_reason(
    candidates: Sequence[Candidate], frontal_order: Sequence[Candidate], failures: dict[str, str]
) -> str:
    """The error text when a study cannot be drafted: what was there and why each frontal failed."""
    if not candidates:
        return "no frontal image: the study has no images"
    if not frontal_order:
        views = ", ".join(sorted({_label(c.view) for c in candidates}))
        return f"no frontal image: the study has no PA, AP or unknown-view image (only {views})"
    tried = "; ".join(
        f"{_label(c.view)} #{c.instance_number if c.instance_number is not None else '?'}: "
        f"{failures[c.sop_instance_uid]}"
        for c in frontal_order[:MAX_LISTED_FAILURES]
    )
    more = len(frontal_order) - MAX_LISTED_FAILURES
    return f"no frontal image could be prepared: {tried}" + (f"; {more} more" if more > 0 else "")


def _label(view: View) -> str:
    return _LABELS[view]


def prepare(path: Path, max_side: int, limits: LimitsConfig = DEFAULT_LIMITS) -> np.ndarray:
    """Decode one stored single-frame grayscale image into model pixels.

    Returns a 2-D uint8 array in display polarity (bone white), its longest side at most
    `max_side` (never enlarged), aspect ratio kept. Nothing is decoded before the header and the
    codestream's own frame header are within `limits`. This runs the decoder in the calling
    process: the node calls it through `cxr_node.decoder.DecoderProcess`.
    """
    _require_positive("max_side", max_side)
    with _failing_as("not readable as DICOM", path):
        ds = pydicom.dcmread(path, force=True)
    with _failing_as("unusable image header", path):
        syntax = _ensure_transfer_syntax(ds)
        if "PixelData" not in ds:
            raise ImagingError("no Pixel Data: not an image, or the file is truncated")
        check_declared_size(ds, limits)
        _check_single_grayscale_frame(ds)
        _check_codestream(ds, syntax)
    with _failing_as(f"pixel data cannot be decoded ({_syntax_name(syntax)})", path):
        stored = ds.pixel_array
    if stored.ndim != 2:
        raise ImagingError(
            f"decoded pixel data has shape {stored.shape}, expected one grayscale frame"
        )
    if stored.min() == stored.max():
        raise ImagingError(f"blank image: every pixel has the value {stored.min()}")
    with _failing_as("grayscale transform failed", path):
        unit = _voi_unit(_modality_values(stored, ds), ds)
        if _displays_inverted(ds):
            np.subtract(1.0, unit, out=unit)
    return _shrink(unit, max_side)


@contextmanager
def _failing_as(step: str, path: Path) -> Iterator[None]:
    """Turn whatever a library raises on bad input into an ImagingError that names the step.

    The library's message is kept short and one line, and never names the file (its name can
    hold a UID): an OSError gives only its cause, and the path is cut from any other message.
    """
    try:
        yield
    except (ImagingError, MemoryError):  # out of memory: the decoder process reports the limit
        raise
    except Exception as exc:  # pydicom and its plugins raise many types on corrupt input
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        for name in (str(path), path.name):
            text = re.sub(rf"(?<![\w.]){re.escape(name)}(?![\w.])", "the file", text)
        raise ImagingError(f"{step}: {_printable(text) or type(exc).__name__}") from exc


def _printable(text: str, limit: int = MAX_DETAIL_CHARACTERS) -> str:
    """One line of printable ASCII, at most ``limit`` characters: fit for a reason or a log."""
    text = re.sub(r"[^\x20-\x7e]", "?", " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _syntax_name(syntax: UID) -> str:
    """The registered name of a transfer syntax; never the UID text itself, which a peer wrote."""
    return syntax.name if syntax.name != str(syntax) else "unregistered transfer syntax"


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    """Files without a File Meta header (ACR-NEMA style) get the syntax they were read with."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        syntax = _SYNTAX_OF_ENCODING.get(ds.original_encoding, ImplicitVRLittleEndian)
        ds.file_meta.TransferSyntaxUID = syntax
    return UID(syntax)


def check_declared_size(ds: Dataset, limits: LimitsConfig) -> None:
    """Refuse an image whose header declares more than `limits` allow (read from the header only).

    Rows x Columns x frames x samples is bounded by ``max_image_pixels``, and that many values of
    Bits Allocated by ``max_decoded_mb``: what a decoder would allocate for its output.
    """
    rows, columns = _header_count(ds, "Rows"), _header_count(ds, "Columns")
    frames = _header_count(ds, "NumberOfFrames", default=1)
    samples = _header_count(ds, "SamplesPerPixel", default=1)
    bits = _header_count(ds, "BitsAllocated")
    values = rows * columns * frames * samples
    if values > limits.max_image_pixels:
        raise ImagingError(
            f"the header declares {rows} x {columns} pixels x {frames} frame(s) x {samples} "
            f"sample(s) = {values:,}, more than limits.max_image_pixels "
            f"({limits.max_image_pixels:,}); not decoded"
        )
    decoded_mb = values * bits / 8 / 2**20
    if decoded_mb > limits.max_decoded_mb:
        raise ImagingError(
            f"the image would decode to {decoded_mb:,.1f} MB ({bits} bits allocated), more than "
            f"limits.max_decoded_mb ({limits.max_decoded_mb}); not decoded"
        )


def _header_count(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A positive whole number from the header; its text is quoted only when it is one."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ImagingError(f"{keyword} in the header is missing")
        return default
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ImagingError(f"{keyword} in the header is not a whole number") from None
    if not 1 <= count < 2**31:
        raise ImagingError(f"{keyword} in the header is out of range (1 to 2147483647)")
    return count


def _check_codestream(ds: Dataset, syntax: UID) -> None:
    """Refuse a codestream whose own frame header declares another size than the DICOM header.

    Decoders allocate what the codestream declares, so a small header in front of a codestream
    claiming 16384 x 16384 pixels would bypass `check_declared_size`. Syntaxes whose codestream
    has no cheaply read size (RLE, deflate: their output size follows the header) are not checked.
    """
    if syntax in _JPEG_SYNTAXES:
        declared = _jpeg_frame_size(_codestream_start(ds))
    elif syntax in _JPEG2000_SYNTAXES:
        declared = _jpeg2000_image_size(_codestream_start(ds))
    else:
        return
    header = (_header_count(ds, "Rows"), _header_count(ds, "Columns"),
              _header_count(ds, "SamplesPerPixel", default=1))
    if declared != header:
        raise ImagingError(
            "the compressed codestream declares {} x {} x {}, the DICOM header {} x {} x {} "
            "(rows x columns x samples); not decoded".format(*declared, *header)
        )


def _codestream_start(ds: Dataset) -> bytes:
    """The first CODESTREAM_SCAN_BYTES of the codestream, across fragments (one frame: checked)."""
    items = io.BytesIO(ds.PixelData)
    parse_basic_offsets(items)
    start = bytearray()
    for fragment in generate_fragments(items):
        start += fragment[: CODESTREAM_SCAN_BYTES - len(start)]
        if len(start) == CODESTREAM_SCAN_BYTES:
            break
    if not start:
        raise ImagingError("the encapsulated Pixel Data holds no codestream")
    return bytes(start)


def _jpeg_frame_size(stream: bytes) -> tuple[int, int, int]:
    """(lines, samples per line, components) of the frame header of a JPEG or JPEG-LS stream."""
    if stream[:2] != b"\xff\xd8":
        raise ImagingError("the codestream does not start with a JPEG SOI marker")
    position = 2
    while position + 4 <= len(stream) and stream[position] == 0xFF:
        marker = stream[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
        elif marker in _SOF_MARKERS and position + 10 <= len(stream):
            lines, samples = struct.unpack_from(">HH", stream, position + 5)
            return lines, samples, stream[position + 9]
        elif marker in (0xD8, 0xD9, 0xDA):  # a second SOI, the end, or a scan before any frame
            break
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
        else:
            position += 2 + struct.unpack_from(">H", stream, position + 2)[0]
    raise ImagingError("no JPEG frame header (SOF) where the codestream should have one")


def _jpeg2000_image_size(stream: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from the SIZ segment that follows SOC (ISO 15444-1 A.5.1).

    Searched for rather than expected at offset 0, so that a JP2 file wrapped by mistake is read.
    """
    start = stream.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 42 > len(stream):
        raise ImagingError("no JPEG 2000 SIZ segment where the codestream should have one")
    width, height, left, top = struct.unpack_from(">IIII", stream, start + 8)
    (components,) = struct.unpack_from(">H", stream, start + 40)
    return height - top, width - left, components


def _check_single_grayscale_frame(ds: Dataset) -> None:
    samples = _header_count(ds, "SamplesPerPixel", default=1)
    if samples != 1:
        raise ImagingError(
            f"colour image (Samples per Pixel {samples}); only grayscale radiographs can be used"
        )
    frames = _header_count(ds, "NumberOfFrames", default=1)
    if frames != 1:
        raise ImagingError(
            f"multi-frame image ({frames} frames); only single-frame radiographs can be used"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(
            f"Photometric Interpretation {_printable(photometric, 16) or '(missing)'} is not "
            "grayscale"
        )


def _modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT stage (PS3.3 C.11.1), with Rescale Slope and Intercept in float32.

    pydicom's apply_modality_lut rescales in float64: twice the memory of the largest array in
    the rendering, for no difference an 8-bit image can show.
    """
    if ds.get("ModalityLUTSequence") or "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return apply_modality_lut(stored, ds)
    values = stored.astype(np.float32)
    values *= float(ds.RescaleSlope)
    values += float(ds.RescaleIntercept)
    return values


def _voi_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the VOI stage (PS3.3 C.11.2), scaled to 0..1 (0 = lowest output value)."""
    if ds.get("VOILUTSequence"):
        return _voi_lut_unit(values, ds)
    window = _first_window(ds)
    if window is not None:
        return _window_unit(
            values, *window, str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        )
    return _scaled(values, *_robust_window(values))


def _voi_lut_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """First VOI LUT, scaled by the range its data actually spans.

    The LUT Descriptor's bit depth is often wrong in practice (16 declared, 12 used), so the
    LUT's own output range, not 2**bits, is taken as black..white.
    """
    entries, first_mapped, _ = ds.VOILUTSequence[0].LUTDescriptor
    inputs = np.arange(first_mapped, first_mapped + (entries or 2**16))
    lut_output = apply_voi(inputs, ds, index=0)
    low, high = float(lut_output.min()), float(lut_output.max())
    if high <= low:
        raise ImagingError("the VOI LUT maps every value to the same grey")
    # Looked up in the LUT read above, clipped to its inputs: pydicom's own lookup indexes
    # through uint16 (larger values wrap) and takes several full-size copies of the image.
    positions = np.rint(values, dtype=np.float32)
    np.clip(positions, inputs[0], inputs[-1], out=positions)
    positions -= first_mapped
    return _scaled(lut_output[positions.astype(np.int32)], low, high)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width pair; None when absent or unusable (width not positive)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = (_first_value(ds[keyword].value) for keyword in ("WindowCenter", "WindowWidth"))
    if center is None or width is None or width <= 0:
        log.warning(
            "imaging.window_unusable",
            center=center,
            width=width,
            reason="window center/width missing or width not positive; using a robust window",
        )
        return None
    return center, width


def _first_value(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)


def _window_unit(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing, output 0..1."""
    if function == "SIGMOID":
        sigmoid: np.ndarray = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return sigmoid.astype(np.float32)
    if function != "LINEAR_EXACT":
        if function != "LINEAR":
            log.warning(
                "imaging.voi_function_unknown", function=function, reason="treated as LINEAR"
            )
        # LINEAR shifts the window by half a step so that integer inputs land on its edges.
        center, width = center - 0.5, max(width - 1.0, float(np.finfo(np.float32).eps))
    return _scaled(values, center - width / 2, center + width / 2)


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map low..high to 0..1, clipping outside: the linear core of every VOI stage here.

    One new float32 array, changed in place: the largest image the limits admit stays well
    inside the decoder's memory limit.
    """
    unit: np.ndarray = np.subtract(values, low, dtype=np.float32)
    unit /= high - low
    np.clip(unit, 0.0, 1.0, out=unit)
    return unit


def _robust_window(values: np.ndarray) -> tuple[float, float]:
    """Percentile window over the anatomy rather than the collimated border.

    Two cheap cuts: the outer margin of the image (a collimator edge near the film border), and
    the pixels at the extreme values of what remains (a shutter mask written as one constant).
    """
    rows, columns = values.shape
    dy, dx = int(rows * COLLIMATION_MARGIN), int(columns * COLLIMATION_MARGIN)
    centre = values[dy : rows - dy, dx : columns - dx]
    step = max(1, math.ceil(math.sqrt(centre.size / ROBUST_WINDOW_SAMPLES)))
    centre = centre[::step, ::step]
    anatomy = centre[(centre > centre.min()) & (centre < centre.max())]
    low, high = (
        float(v)
        for v in np.percentile(anatomy if anatomy.size else centre, ROBUST_WINDOW_PERCENTILES)
    )
    if high <= low:  # nothing varies inside; the whole image does (blank images were rejected)
        low, high = float(values.min()), float(values.max())
    return low, high


def _displays_inverted(ds: Dataset) -> bool:
    """Whether the lowest value is shown white.

    MONOCHROME1 says so, and so does Presentation LUT Shape INVERSE. They are not two inversions:
    PS3.3 C.7.6.1 (General Image Module) requires INVERSE whenever the image is MONOCHROME1, so a
    MONOCHROME1 + INVERSE file is merely consistent and is inverted once.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        log.warning(
            "imaging.polarity_conflict",
            reason="MONOCHROME2 with Presentation LUT Shape INVERSE; displaying inverted",
        )
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def model_pixels(unit: np.ndarray, max_side: int) -> np.ndarray:
    """Display values (0..1, 0 black) as model pixels, the way `prepare` ends: for images that
    come as pictures (PNG, JPEG) rather than DICOM, so both are scaled alike."""
    _require_positive("max_side", max_side)
    return _shrink(unit, max_side)


def _shrink(unit: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average down so the longest side is at most max_side, then quantise to 8 bits."""
    rows, columns = unit.shape
    scale = max_side / max(rows, columns)
    if scale < 1.0:
        size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
        image = Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32))
        unit = np.asarray(image.resize(size, Image.Resampling.BOX))
    pixels: np.ndarray = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels


def _check_model_pixels(pixels: object) -> None:
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or 0 in pixels.shape
    ):
        detail = (
            f"{pixels.dtype} array of shape {pixels.shape}"
            if isinstance(pixels, np.ndarray)
            else type(pixels).__name__
        )
        raise ValueError(f"model pixels must be a non-empty 2-D uint8 array, got {detail}")


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
