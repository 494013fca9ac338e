"""A received Part-10 file, checked from its header before anything is kept or decoded.

Everything in a dataset comes from the peer and is hostile until checked: its UIDs become database
keys and audit records, its Rows and Columns become allocations when the image is decoded. Only
what the node needs is read (pydicom skips every other element, and stops before Pixel Data); the
bytes actually parsed are bounded, so a header of a million tiny elements costs a refusal, not the
memory to hold them.

C-STORE failure statuses (PS3.4 Annex B.2.3) the checks answer with:

- 0xC000 *Error: Cannot understand*: the request or the dataset is not DICOM the node can use (a
  UID that breaks the PS3.5 syntax, a missing UID, incomplete Pixel Data, an image beyond
  ``limits``). Permanent: the same bytes sent again get the same answer, so a modality does not
  retry it for ever as it would a 0xA7xx.
- 0xA900 *Error: Data Set does not match SOP Class*: a well-formed dataset whose SOP Class or
  Instance UID is not the one its C-STORE request announced.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from cxr_node.config import LimitsConfig
from cxr_node.imaging import view_of

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

UID_MAX_CHARS = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
REQUIRED_UIDS = {"StudyInstanceUID": "Study Instance UID",
                 "SeriesInstanceUID": "Series Instance UID",
                 "SOPInstanceUID": "SOP Instance UID", "SOPClassUID": "SOP Class UID"}
# What the node reads from a header: the UIDs, routing attributes, the view and the image size.
HEADER_TAGS = [*REQUIRED_UIDS, "Modality", "BodyPartExamined", "ViewPosition", "ViewCodeSequence",
               "InstanceNumber", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
               "NumberOfFrames"]
HEADER_READ_BYTES = 4 << 20
"""Bytes of the header pydicom may parse (values it skips are free). Undefined-length sequences
are parsed whole; a real CR/DX header is a few kB, this bounds what a crafted one can cost."""
CODE_STRING_CHARS = 64  # CS is 16 characters; vendors overrun it, attackers more so
DEFER_BYTES = 64 << 10  # values longer than this are skipped, never read
PIXEL_DATA = 0x7FE00010
ITEM, SEQ_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


class Rejected(Exception):
    """A dataset the node will not store; carries the C-STORE failure status to answer.

    ``keep``: whether its bytes are worth quarantining (not when they are the problem's size).
    """

    def __init__(self, status: int, reason: str, keep: bool = True):
        self.status = status
        self.reason = reason
        self.keep = keep
        super().__init__(reason)


def uid_problem(value: Any) -> str | None:
    """Why ``value`` is not a UID as PS3.5 9.1 defines it (digits and dots, no empty component,
    no leading zero in a component of several digits, 64 characters at most), or None."""
    if not isinstance(value, str):
        return "not one text value"
    if not value:
        return "empty"
    if len(value) > UID_MAX_CHARS:
        return f"over {UID_MAX_CHARS} characters ({len(value)})"
    if _UID.fullmatch(value):
        return None
    if value.strip("0123456789."):
        return "not only digits and dots"
    if value.startswith(".") or value.endswith(".") or ".." in value:
        return "empty component"
    return "leading zero"


def check_uid(name: str, value: Any) -> str:
    """``value`` if it is a valid UID; else the refusal, which names the attribute, not the value
    (and fits the 64 characters of the response's Error Comment)."""
    problem = uid_problem(value)
    if problem:
        raise Rejected(CANNOT_UNDERSTAND, f"invalid {name}: {problem}")
    return str(value)


def shown_uid(value: Any) -> str:
    """A UID for the audit trail: itself when valid, else a short escaped excerpt and its length."""
    text = str(value)
    if uid_problem(text) is None:
        return text
    excerpt = text[:UID_MAX_CHARS].encode("unicode_escape").decode("ascii")
    return f"(invalid, {len(text)} characters) {excerpt}"


@dataclass(frozen=True)
class Limits:
    """What one C-STORE may make the node store, and one image make it decode (``limits``)."""

    max_dataset_bytes: int
    max_image_pixels: int
    max_decoded_bytes: int

    @classmethod
    def of(cls, limits: LimitsConfig) -> Limits:
        return cls(limits.max_dataset_mb << 20, limits.max_image_pixels,
                   limits.max_decoded_mb << 20)

    def image_problem(self, ds: Dataset) -> str | None:
        """Why the image the header declares is beyond the limits, or None."""
        rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
        frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
        bits = _int(ds, "BitsAllocated", 0)
        if min(rows, columns, frames, samples, bits) < 0 or frames == 0 or samples == 0:
            return "invalid image dimensions"
        pixels = rows * columns * frames * samples
        if pixels > self.max_image_pixels:
            return (f"image {rows}x{columns}x{frames} frames x{samples} exceeds "
                    f"limits.max_image_pixels")
        if pixels * bits // 8 > self.max_decoded_bytes:
            return f"image decodes to {pixels * bits // 8 >> 20} MB: over limits.max_decoded_mb"
        return None


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute (US or IS), ``default`` when absent; -1 when it is not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return -1


@dataclass(frozen=True)
class Header:
    """The few attributes the node needs from an incoming dataset, each checked."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    view: str
    instance_number: int | None
    transfer_syntax: str
    size: int  # of the dataset, after the File Meta group

    @classmethod
    def parse(cls, path: Path, limits: Limits, request: tuple[str, str] | None = None) -> Header:
        """Read and check the header of a received Part-10 file, and that its Pixel Data is
        complete (from the element's header and the file's size; nothing is decoded).

        ``request``: the (SOP Class, SOP Instance) UIDs the C-STORE request named; None for a
        file found in the spool, whose own UIDs are then the reference.
        """
        if request:
            check_uid("request SOP Class UID", request[0])
            check_uid("request SOP Instance UID", request[1])
        try:
            with path.open("rb") as fh:
                start, size = dataset_span(fh)
                if size > limits.max_dataset_bytes:
                    raise Rejected(CANNOT_UNDERSTAND, "dataset larger than limits.max_dataset_mb",
                                   keep=False)
                ds, at = _read_header(fh)
                missing = [name for key, name in REQUIRED_UIDS.items() if key not in ds]
                if missing:
                    raise Rejected(CANNOT_UNDERSTAND, f"missing {', '.join(missing)}")
                uids = {key: check_uid(name, ds[key].value) for key, name in REQUIRED_UIDS.items()}
                sop = (uids["SOPClassUID"], uids["SOPInstanceUID"])
                if request and sop != request:
                    raise Rejected(DATASET_MISMATCH,
                                   "SOP Class/Instance UID differ from the C-STORE request")
                ts = ds.file_meta.TransferSyntaxUID
                problem = limits.image_problem(ds) or _pixel_data_problem(
                    fh, at, start + size, ds, ts)
                if problem:
                    raise Rejected(CANNOT_UNDERSTAND, problem)
                number = _int(ds, "InstanceNumber", -1)
                return cls(
                    study_uid=uids["StudyInstanceUID"], series_uid=uids["SeriesInstanceUID"],
                    sop_instance_uid=sop[1], sop_class_uid=sop[0],
                    modality=_code_string(ds, "Modality"),
                    body_part=_code_string(ds, "BodyPartExamined"),
                    view_position=_code_string(ds, "ViewPosition"),
                    view=str(view_of(ds).value),
                    instance_number=number if 0 <= number < 2**31 else None,
                    transfer_syntax=str(ts), size=size,
                )
        except Rejected:
            raise
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, struct.error,
                OSError, AttributeError, NotImplementedError, RecursionError) as exc:
            raise Rejected(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc


class _CountedReads:
    """The file as pydicom reads it, with a budget on the bytes it actually reads."""

    def __init__(self, fh: BinaryIO, budget: int):
        self._fh = fh
        self._budget = budget
        self.exhausted = False
        self.seek, self.tell, self.name = fh.seek, fh.tell, fh.name

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._budget -= len(data)
        if self._budget < 0:
            self.exhausted = True  # pydicom turns any error into its own: remember the cause
            raise ValueError("header read budget exhausted")
        return data


def _read_header(fh: BinaryIO) -> tuple[Dataset, int]:
    """The header attributes the node uses, and where Pixel Data (or the end) starts.

    A value longer than ``DEFER_BYTES`` is never loaded: a UID that long is refused, any other
    such attribute treated as absent.
    """
    fh.seek(0)
    reader = _CountedReads(fh, HEADER_READ_BYTES)
    try:
        ds = dcmread(reader, stop_before_pixels=True, specific_tags=HEADER_TAGS,  # type: ignore[arg-type]
                     defer_size=DEFER_BYTES)
    except Exception:
        if reader.exhausted:
            raise Rejected(CANNOT_UNDERSTAND, f"header parses more than "
                           f"{HEADER_READ_BYTES >> 20} MB", keep=False) from None
        raise
    at = fh.tell()
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if elem.value is None and getattr(elem, "length", 0):  # deferred: too long to load
            name = REQUIRED_UIDS.get(keyword_for_tag(tag))
            if name:
                raise Rejected(CANNOT_UNDERSTAND, f"invalid {name}: over {UID_MAX_CHARS} "
                               "characters")
            del ds[tag]
    return ds, at


def _code_string(ds: Dataset, keyword: str) -> str:
    """A short routing attribute, upper case; empty when absent or not a plausible value."""
    value = ds.get(keyword)
    if not isinstance(value, str) or len(value) > CODE_STRING_CHARS or not value.isprintable():
        return ""
    return value.strip().upper()


def dataset_span(fh: BinaryIO) -> tuple[int, int]:
    """Where the dataset starts in a Part-10 file (after preamble, "DICM" and the File Meta
    group, whose first element gives its length) and how many bytes it has."""
    fh.seek(0)
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part-10 file with a File Meta group length")
    (group_length,) = struct.unpack_from("<I", head, 140)
    offset = 144 + group_length
    return offset, os.fstat(fh.fileno()).st_size - offset


def same_dataset(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Whether two Part-10 files hold the same dataset bytes (their File Meta may differ)."""
    try:
        with a.open("rb") as fa, b.open("rb") as fb:
            (start_a, size_a), (start_b, size_b) = dataset_span(fa), dataset_span(fb)
            if size_a != size_b:
                return False
            fa.seek(start_a)
            fb.seek(start_b)
            while block := fa.read(chunk):
                if block != fb.read(chunk):
                    return False
            return True
    except (OSError, ValueError):
        return False  # a copy that cannot be read is not the same


def _pixel_data_problem(fh: BinaryIO, at: int, size: int, ds: Dataset, ts: UID) -> str | None:
    """Why the Pixel Data is incomplete, or None. pydicom parses a cut file without complaint.

    ``at`` is where pydicom stopped (the first pixel-like tag), ``size`` the file's length.
    """
    if at >= size:
        return "no Pixel Data" if "Rows" in ds else None
    fh.seek(at)
    head = fh.read(12)
    tag_group, tag_elem = struct.unpack_from("<HH", head)
    if (tag_group << 16 | tag_elem) != PIXEL_DATA:
        return None  # stopped at a pixel-like tag other than Pixel Data (float/double data)
    if ts.is_implicit_VR:
        (length,), header = struct.unpack_from("<I", head, 4), 8
    else:
        (length,), header = struct.unpack_from("<I", head, 8), 12
    start = at + header
    if length != 0xFFFFFFFF:
        needed = _native_length(ds)
        if start + length > size:
            return f"Pixel Data truncated: {size - start} of {length} bytes"
        if needed and length < needed:
            return f"Pixel Data has {length} bytes, the image needs {needed}"
        return None
    pos = start
    while pos + 8 <= size:
        fh.seek(pos)
        group, elem, item_len = struct.unpack("<HHI", fh.read(8))
        tag = group << 16 | elem
        if tag == SEQ_DELIMITER:
            return None
        if tag != ITEM:
            return f"encapsulated Pixel Data has an unexpected tag at byte {pos}"
        pos += 8 + item_len
    return "encapsulated Pixel Data truncated (no sequence delimiter)"


def _native_length(ds: Dataset) -> int:
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    rows, columns, bits = _int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "BitsAllocated", 0)
    return max(rows * columns * samples * frames * bits // 8, 0)
