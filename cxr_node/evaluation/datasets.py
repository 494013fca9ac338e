"""The studies an evaluation drafts: a manifest (CSV or JSON lines), or the IU X-ray Open-i layout.

A manifest is written by whoever runs the evaluation, often from a spreadsheet, so every line is
checked before anything is drafted and each problem names the file and line: ids (printable,
unique), images (1 to MAX_IMAGES_PER_STUDY files, each existing), views, texts (bounded), and
paths. Paths are relative to the manifest's folder and must stay inside it, after following
symlinks, unless the caller allows paths outside (`allow_outside`): a manifest from elsewhere
cannot make the evaluation read /etc or another user's files.

Images go through the node's own imaging code, in its decoder process (memory and time limits):
DICOM files as live studies (`imaging.prepare`), PNG and JPEG files read by Pillow within
`limits` and scaled by the same last step (`imaging.model_pixels`). A study's images are chosen
as the node chooses them (`imaging.select_images`: the frontal, then the lateral).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_node.config import LimitsConfig
from cxr_node.decoder import DecoderProcess
from cxr_node.durable import OutsideRoot, confined, write_atomic
from cxr_node.evaluation.jsonl import MAX_ID_CHARS, MAX_LINE_BYTES, MAX_RECORDS
from cxr_node.evaluation.mesh import iu_reports
from cxr_node.imaging import Candidate, ImagingError, Selection, View, model_pixels, select_images

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_STUDIES = MAX_RECORDS
MAX_IMAGES_PER_STUDY = 16
MAX_SECTION_CHARS = 20_000
MAX_PATIENT_ID_CHARS = 64
MAX_PATH_CHARS = 4096
MAX_LISTED_ERRORS = 10
MAX_INDEXED_FILES = 200_000
"""Files an IU X-ray folder may hold (the Open-i set has 7,470 images)."""
IU_REPORTS = "NLMCXR_reports.tgz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
LIST_SEPARATOR = "|"
"""Between the images (and the views) of one study in a CSV cell, as in NIH's label files."""
COLUMNS = ("id", "images", "views", "findings", "impression", "patient_id", "day", "source",
           "licence")
"""day (YYYY-MM-DD), source and licence are optional: a training corpus keeps each record's
licence with it, and an adapter card reports the sources and dates it learnt from."""
MAX_SOURCE_CHARS = 200
REQUIRED = ("id", "images", "findings", "impression")
VIEWS = {"PA": View.PA, "AP": View.AP, "LATERAL": View.LATERAL, "LAT": View.LATERAL,
         "LL": View.LATERAL, "RL": View.LATERAL, "UNKNOWN": View.UNKNOWN}
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class DatasetError(ValueError):
    """A manifest or dataset folder that cannot be used; one line per problem, each naming the
    file and line (at most MAX_LISTED_ERRORS, then how many more)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED_ERRORS]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more > 0 else [])))


@dataclass(frozen=True)
class StudyImage:
    """One image file; `view` None: from the DICOM header, unknown for a picture."""

    path: Path
    view: View | None = None


@dataclass(frozen=True)
class Study:
    """One study to draft, with the reference report it is measured against."""

    id: str
    images: tuple[StudyImage, ...]
    findings: str
    impression: str
    patient_id: str | None = None
    day: str | None = None
    source: str | None = None
    licence: str | None = None

    @property
    def reference(self) -> str:
        """The reference text scored: findings, then impression."""
        return " ".join(part for part in (self.findings, self.impression) if part)


@dataclass(frozen=True)
class Dataset:
    source: Path
    layout: str
    studies: tuple[Study, ...]
    skipped: tuple[tuple[str, str], ...]
    """(study id, why) of the studies the source has but that cannot be evaluated."""
    fingerprint: str
    """sha256 of the source's texts and the images' names and sizes: a run resumes only on the
    same data."""


def load_dataset(path: Path, allow_outside: bool = False) -> Dataset:
    """A manifest (`.csv`, `.jsonl`) or an IU X-ray folder (holding NLMCXR_reports.tgz)."""
    path = Path(path)
    if path.is_dir():
        return _iu_folder(path)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DatasetError([f"{path}: expected a manifest (.csv or .jsonl) or a folder holding "
                            f"{IU_REPORTS} and its images"])
    return _manifest(path, allow_outside)


# -- manifests ----------------------------------------------------------------------------------


def _manifest(path: Path, allow_outside: bool) -> Dataset:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise DatasetError([f"{path}: {size:,} bytes, more than {MAX_MANIFEST_BYTES:,}; "
                                "split the manifest"])
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError([f"{path}:{line}: not UTF-8"]) from None
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _jsonl_rows(text, path)
    problems: list[str] = []
    studies: list[Study] = []
    first_line: dict[str, int] = {}
    hasher = hashlib.sha256(data)
    for number, row in rows:
        where = f"{path}:{number}"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        try:
            study = _study(row, path.parent, allow_outside)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if study.id in first_line:
            problems.append(f"{where}: id {study.id!a} again (first on line "
                            f"{first_line[study.id]})")
            continue
        first_line[study.id] = number
        if len(studies) == MAX_STUDIES:
            problems.append(f"{where}: more than {MAX_STUDIES} studies; split the manifest")
            break
        studies.append(study)
        for image in study.images:
            hasher.update(f"{image.path}\0{image.path.stat().st_size}\0".encode())
    if problems:
        raise DatasetError(problems)
    if not studies:
        raise DatasetError([f"{path}: no studies"])
    return Dataset(path.resolve(), "manifest", tuple(studies), (), hasher.hexdigest())


Row = dict[str, Any]


def write_manifest(path: Path, rows: Sequence[Row]) -> None:
    """A manifest in JSON lines (the corpus builder's, the node's pairs, a training split), private
    and whole or not at all."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, Row | str]]:
    """(line, row) of a CSV with a header line; line numbers as a spreadsheet shows them."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
    except csv.Error as exc:
        raise DatasetError([f"{path}:1: not CSV ({exc})"]) from None
    unknown = [h for h in header if h not in COLUMNS]
    missing = [c for c in REQUIRED if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise DatasetError([
            f"{path}:1: the header must name the columns {', '.join(REQUIRED)} and optionally "
            f"{', '.join(c for c in COLUMNS if c not in REQUIRED)}, each once; found "
            f"{', '.join(map(ascii, header)) or 'nothing'}"])
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"not CSV ({exc})"
            return
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield reader.line_num, f"{len(cells)} cells, the header has {len(header)}"
            continue
        row: Row = dict(zip(header, cells, strict=True))
        images = [p.strip() for p in row.pop("images").split(LIST_SEPARATOR)]
        views = [v.strip() for v in row.pop("views", "").split(LIST_SEPARATOR)]
        if views == [""]:
            views = [""] * len(images)
        if len(views) != len(images):
            yield reader.line_num, (f"{len(images)} images but {len(views)} views (separate "
                                    f"both with {LIST_SEPARATOR!r})")
            continue
        row["images"] = [{"path": p, "view": v} for p, v in zip(images, views, strict=True)]
        yield reader.line_num, row


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, Row | str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line.encode()) > MAX_LINE_BYTES:
            yield number, f"longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            yield number, f"not JSON ({str(exc)[:80]})"
            continue
        if not isinstance(value, dict):
            yield number, f"expected an object, got {type(value).__name__}"
            continue
        unknown = sorted(set(value) - set(COLUMNS) - {"views"})
        if unknown or "views" in value:
            known = ", ".join(c for c in COLUMNS if c != "views")
            yield number, (f"unknown key {ascii((unknown or ['views'])[0])} (expected: {known}; "
                           'a view goes with its image: {"path": ..., "view": ...})')
            continue
        yield number, value


def _study(row: Row, folder: Path, allow_outside: bool) -> Study:
    """One manifest row as a Study, or ValueError saying what is wrong with it."""
    study_id = _identifier(row.get("id"), "id", MAX_ID_CHARS, required=True)
    assert study_id is not None
    texts = {key: _section(row.get(key), key) for key in ("findings", "impression")}
    if not any(texts.values()):
        raise ValueError("findings and impression are both empty: nothing to measure against")
    images = row.get("images")
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES_PER_STUDY:
        raise ValueError(f'"images" must list 1 to {MAX_IMAGES_PER_STUDY} images')
    return Study(
        id=study_id,
        images=tuple(_image(item, n, folder, allow_outside) for n, item in enumerate(images, 1)),
        findings=texts["findings"],
        impression=texts["impression"],
        patient_id=_identifier(row.get("patient_id"), "patient_id", MAX_PATIENT_ID_CHARS),
        day=_day(row.get("day")),
        source=_identifier(row.get("source"), "source", MAX_SOURCE_CHARS),
        licence=_identifier(row.get("licence"), "licence", MAX_SOURCE_CHARS),
    )


def _day(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError('"day" must be a date as YYYY-MM-DD') from None


def _identifier(value: Any, key: str, limit: int, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise ValueError(f'"{key}" is missing')
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'"{key}" must be a string or an integer')
    text = str(value).strip()
    if not 1 <= len(text) <= limit or not text.isprintable():
        raise ValueError(f'"{key}" must be 1 to {limit} printable characters')
    return text


def _section(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be text')
    if len(value) > MAX_SECTION_CHARS:
        raise ValueError(f'"{key}" is longer than {MAX_SECTION_CHARS} characters')
    return " ".join(value.split())


def _image(item: Any, number: int, folder: Path, allow_outside: bool) -> StudyImage:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict) or set(item) - {"path", "view"}:
        raise ValueError(f'image {number}: expected a path, or {{"path": ..., "view": ...}}')
    name, view = item.get("path"), item.get("view")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_PATH_CHARS \
            or "\0" in name:
        raise ValueError(f"image {number}: the path must be 1 to {MAX_PATH_CHARS} characters")
    path = folder / name.strip()
    if not allow_outside:
        try:
            path = confined(path, folder)
        except OutsideRoot:
            raise ValueError(f"image {number}: {name.strip()!a} is outside the manifest's "
                             "folder (allow it with --allow-outside-paths)") from None
    if not path.is_file():
        raise ValueError(f"image {number}: {name.strip()!a} is not a file")
    return StudyImage(path.resolve(), _view(view, number))


def _view(value: Any, number: int) -> View | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or value.strip().upper() not in VIEWS:
        raise ValueError(f"image {number}: view {str(value)[:20]!a} is not one of "
                         f"{', '.join(VIEWS)} (or empty: from the DICOM header)")
    return VIEWS[value.strip().upper()]


# -- the IU X-ray Open-i layout -----------------------------------------------------------------


def _iu_folder(folder: Path) -> Dataset:
    """NLMCXR_reports.tgz in `folder`, and the images anywhere below it, named as the XMLs'
    parentImage ids (`CXR1_1_IM-0001-3001.png`, as in NLMCXR_png.tgz) or as in NLMCXR_dcm.tgz
    (the id without "CXR": `1_IM-0001-3001.dcm`). An id only ever looks up a file found in the
    folder: it never becomes a path."""
    archive = folder / IU_REPORTS
    if not archive.is_file():
        raise DatasetError([f"{folder}: no {IU_REPORTS} (the Open-i report archive) here"])
    index = _image_index(folder)
    with archive.open("rb") as file:
        hasher = hashlib.file_digest(file, "sha256")
    studies, skipped = [], []
    try:
        for report in iu_reports(archive):
            try:  # the member's name: an archive from elsewhere may hold any
                study_id = _identifier(f"CXR{report.number}", "id", MAX_ID_CHARS) or ""
            except ValueError:
                skipped.append((f"CXR{report.number}"[:MAX_ID_CHARS], "its name is not an id"))
                continue
            paths = [index[name] for name in _iu_names(report.images) if name in index]
            if not (report.findings or report.impression):
                skipped.append((study_id, "the report has neither findings nor impression"))
            elif not paths:
                skipped.append((study_id, f"none of its {len(report.images)} image(s) is in "
                                          f"{folder}"))
            else:
                studies.append(Study(study_id, tuple(StudyImage(p) for p in paths),
                                     " ".join(report.findings.split()),
                                     " ".join(report.impression.split())))
                for path in paths:
                    hasher.update(f"{path}\0{path.stat().st_size}\0".encode())
    except (OSError, ValueError, ET.ParseError) as exc:
        raise DatasetError([f"{archive}: not a readable Open-i report archive ({exc})"]) from None
    if not studies:
        raise DatasetError([f"{folder}: no report has both text and an image in the folder "
                            f"({len(skipped)} reports skipped)"])
    return Dataset(folder.resolve(), "iu-xray", tuple(studies), tuple(skipped),
                   hasher.hexdigest())


def _iu_names(ids: Sequence[str]) -> Iterator[str]:
    for image_id in ids:
        yield image_id
        if image_id.startswith("CXR"):
            yield image_id.removeprefix("CXR")


def _image_index(folder: Path) -> dict[str, Path]:
    """File stem -> path of the image files below `folder` (the first by sorted path wins)."""
    found = []
    for path in folder.rglob("*"):
        if len(found) == MAX_INDEXED_FILES:
            raise DatasetError([f"{folder}: more than {MAX_INDEXED_FILES} files"])
        found.append(path)
    index: dict[str, Path] = {}
    for path in sorted(found):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            index.setdefault(path.stem, path)
    return index


# -- images -------------------------------------------------------------------------------------


class StudyImages:
    """Turns a study's image files into the images the model sees, as the node does: chosen by
    `select_images`, decoded in a `DecoderProcess` under `limits`."""

    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.decoder = DecoderProcess(limits)

    def select(self, study: Study, max_side: int, max_images: int) -> Selection:
        """The frontal (and lateral) image; ImagingError when none can be used. Among images of
        one view, the one listed later is taken, as the node takes the repeat exposure."""
        candidates = [
            Candidate(f"image {n:02d}", image.path, image.view or self._header_view(image.path))
            for n, image in enumerate(study.images, 1)]
        return select_images(candidates, max_side, max_images, self.pixels)

    def pixels(self, path: Path, max_side: int) -> np.ndarray:
        if _is_picture(path):
            pixels = self.decoder.run(picture_pixels, path, max_side, self.limits)
            if not isinstance(pixels, np.ndarray):
                raise ImagingError("the decoder returned something other than an image")
            return pixels
        return self.decoder.prepare(path, max_side)

    def _header_view(self, path: Path) -> View:
        if _is_picture(path):
            return View.UNKNOWN
        try:
            return View(self.decoder.run(header_view, path))
        except (ImagingError, ValueError):
            return View.UNKNOWN  # prepare says what is wrong with the file

    def close(self) -> None:
        self.decoder.close()


def _is_picture(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            start = file.read(8)
    except OSError:
        return False  # the decoder's answer names the problem
    return start.startswith((_PNG, _JPEG))


def header_view(path: Path) -> str:
    """The view a DICOM file's header gives (run in the decoder process)."""
    import pydicom

    from cxr_node.imaging import view_of

    try:
        return view_of(pydicom.dcmread(path, stop_before_pixels=True, force=True)).value
    except Exception:  # pydicom raises many types on a broken header; prepare will say which
        return View.UNKNOWN.value


PICTURE_FORMATS = ("PNG", "JPEG")


def picture_pixels(path: Path, max_side: int, limits: LimitsConfig) -> np.ndarray:
    """A PNG or JPEG as model pixels (run in the decoder process).

    The size the file declares is checked against `limits` before it is decoded. 8-bit images
    are taken as displayed; deeper ones (16-bit PNG) are stretched from their lowest to their
    highest value, since their range says nothing about a window. Colour images are converted to
    grey (some public sets store grey X-rays as RGB or RGBA).
    """
    try:
        image = Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImagingError("not readable as a PNG or JPEG image") from None
    with image:
        if image.format not in PICTURE_FORMATS:
            raise ImagingError(f"a {image.format} picture; only PNG and JPEG are read")
        columns, rows = image.size
        if rows * columns > limits.max_image_pixels:
            raise ImagingError(
                f"the picture declares {columns} x {rows} = {rows * columns:,} pixels, more than "
                f"limits.max_image_pixels ({limits.max_image_pixels:,}); not decoded")
        try:
            if image.mode.startswith("I"):
                values = np.asarray(image, dtype=np.float32)
            else:
                values = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImagingError(f"the {image.format} data cannot be decoded "
                               f"({type(exc).__name__}: truncated or corrupt)") from None
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ImagingError("blank image: every pixel has the same value")
    if image.mode.startswith("I"):
        values = (values - low) / (high - low)
    return model_pixels(values, max_side)
