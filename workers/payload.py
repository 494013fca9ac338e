"""The task contract between node and worker, and the reading of a model's text into a report.

No torch here: the node imports this module to build requests the way the worker reads them, and
to read results the way the worker writes them. A request carries pixels and view names only;
nothing in it identifies a patient. A result (DraftResult) is one typed contract, produced by the
worker and validated by the node field by field with bounds on every size, so that whatever
reaches the result backend (a rogue or buggy worker, anyone who can write to Redis or the
embedded broker's folder) costs at most its own study.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from cxr_node.identity import ModelIdentity

TASK_NAME = "cxr.draft_report"
VIEWS = ("PA", "AP", "LATERAL", "UNKNOWN")
MIN_IMAGE_SIDE = 32  # smaller is no chest X-ray, and some processors (Qwen2-VL) cannot take it
MAX_IMAGE_SIDE = 4096
MAX_INDICATION_CHARS = 1000


class PayloadError(ValueError):
    """One request cannot be drafted as sent; the message becomes its DraftResult reason."""


class TransientDraftError(Exception):
    """A batch failed for a reason that may pass (GPU out of memory): the task fails, and the node
    submits the study again (it owns retries; the task never retries itself)."""


@dataclass(frozen=True)
class DraftImage:
    """One 8-bit grayscale image, PNG in base64, its longest side already scaled by the node."""

    view: str
    png_b64: str
    rows: int
    columns: int

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise PayloadError(f"view {self.view!r} is not one of {', '.join(VIEWS)}")
        if not isinstance(self.png_b64, str) or not self.png_b64:
            raise PayloadError("png_b64 must be a non-empty base64 string")
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGE_SIDE:
                raise PayloadError(f"{name} must be an integer from 1 to {MAX_IMAGE_SIDE}, got {value!r}")

    @classmethod
    def from_dict(cls, data: Any) -> DraftImage:
        if not isinstance(data, Mapping):
            raise PayloadError(f"an image must be a mapping, got {type(data).__name__}")
        try:
            return cls(view=data["view"], png_b64=data["png_b64"], rows=data["rows"], columns=data["columns"])
        except KeyError as exc:
            raise PayloadError(f"an image lacks {exc.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"view": self.view, "png_b64": self.png_b64, "rows": self.rows, "columns": self.columns}

    def decode(self) -> Image.Image:
        """The pixels as a PIL image in mode L, checked against the declared size."""
        try:
            data = base64.b64decode(self.png_b64, validate=True)
        except (binascii.Error, ValueError):
            raise PayloadError(f"{self.view} image: png_b64 is not valid base64") from None
        try:
            image = Image.open(io.BytesIO(data))
            if image.format != "PNG":
                raise PayloadError(f"{self.view} image is {image.format}, expected PNG")
            if image.size != (self.columns, self.rows):
                raise PayloadError(
                    f"{self.view} image is {image.size[0]}x{image.size[1]} but the request says "
                    f"{self.columns}x{self.rows} (columns x rows)"
                )
            if image.mode != "L":
                raise PayloadError(f"{self.view} image has mode {image.mode}, expected 8-bit grayscale (L)")
            image.load()
        except PayloadError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise PayloadError(f"{self.view} image is not a readable PNG ({exc})") from None
        if min(image.size) < MIN_IMAGE_SIDE:
            raise PayloadError(f"{self.view} image is {image.size[0]}x{image.size[1]}, too small to read")
        return image


@dataclass(frozen=True)
class DraftRequest:
    """One study to draft: frontal image first; indication only when the node is set to send it."""

    request_id: str
    images: tuple[DraftImage, ...]
    indication: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id or len(self.request_id) > 128:
            raise PayloadError("request_id must be a string of 1 to 128 characters")
        if not self.images:
            raise PayloadError("a request needs at least one image")
        if self.indication is not None and not isinstance(self.indication, str):
            raise PayloadError("indication must be text or null")

    @classmethod
    def from_dict(cls, data: Any) -> DraftRequest:
        if not isinstance(data, Mapping):
            raise PayloadError(f"a request must be a mapping, got {type(data).__name__}")
        images = data.get("images")
        if not isinstance(images, list):
            raise PayloadError("images must be a list")
        return cls(
            request_id=data.get("request_id"),  # type: ignore[arg-type]  # validated above
            images=tuple(DraftImage.from_dict(i) for i in images),
            indication=data.get("indication"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "images": [i.to_dict() for i in self.images],
            "indication": self.indication,
        }


def request_id_of(data: Any) -> str:
    """The id to answer a request with, even one too broken to parse, so results stay aligned."""
    value = data.get("request_id") if isinstance(data, Mapping) else None
    return value if isinstance(value, str) and 1 <= len(value) <= 128 else "unreadable"


def encode_image(pixels: np.ndarray, view: str, max_side: int) -> DraftImage:
    """An 8-bit grayscale array as the task carries it: PNG, longest side at most `max_side`."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {pixels.ndim}-D {pixels.dtype}")
    image = Image.fromarray(pixels)  # 2-D uint8: mode L
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return DraftImage(
        view=view,
        png_b64=base64.b64encode(buffer.getvalue()).decode("ascii"),
        rows=image.height,
        columns=image.width,
    )


@dataclass(frozen=True)
class ParsedReport:
    """The model's text split into sections, or why it is not a usable draft."""

    findings: str = ""
    impression: str = ""
    reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.reason is None


# A heading is "FINDINGS:" / "**Findings:**" / "Impression :" anywhere, or a line that holds
# nothing but the heading word ("## Findings", "**IMPRESSION**").
_HEADING = re.compile(
    r"(?im)^[ \t]*#*[ \t]*[*_]{0,2}[ \t]*(findings|impressions?)[ \t]*[*_]{0,2}[ \t]*:?[ \t]*[*_]{0,2}[ \t]*$"
    r"|(?:[*_]{1,2}[ \t]*)?\b(findings|impressions?)\b[ \t]*[*_]{0,2}[ \t]*:[*_]{0,2}"
)
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*|\d+(?:\.\d+)?")
_DEGENERATE_SHARE = 0.5


def parse_report(text: str) -> ParsedReport:
    """Split generated text at FINDINGS / IMPRESSION headings; refuse empty or degenerate text.

    Text before the first heading (a greeting, "Here is the report") is dropped with a note. No
    headings at all: everything is findings, with a note, since the radiologist reads it anyway.
    """
    body = text.strip()
    problem = degeneracy(body)
    if problem:
        return ParsedReport(reason=problem)
    headings = list(_HEADING.finditer(body))
    if not headings:
        return ParsedReport(findings=_tidy(body), notes=("no FINDINGS/IMPRESSION headings: all text taken as findings",))
    notes: list[str] = []
    sections: dict[str, str] = {}
    for i, match in enumerate(headings):
        word = (match.group(1) or match.group(2)).lower()
        kind = "findings" if word == "findings" else "impression"
        end = headings[i + 1].start() if i + 1 < len(headings) else len(body)
        content = _tidy(body[match.end() : end])
        if kind in sections and content in sections[kind]:
            notes.append(f"{kind} section repeated: the repeat was dropped")
        elif kind in sections:
            notes.append(f"{kind} heading repeated: the later section was appended")
            sections[kind] = f"{sections[kind]}\n{content}".strip()
        else:
            sections[kind] = content
    preamble = _tidy(body[: headings[0].start()])
    if preamble:
        if "findings" not in sections:
            sections["findings"] = preamble  # "<findings text> IMPRESSION: ..." is common
        else:
            notes.append("text before the first heading was dropped")
    findings, impression = sections.get("findings", ""), sections.get("impression", "")
    if not findings and not impression:
        return ParsedReport(reason="the headings have no text under them", notes=tuple(notes))
    if not impression:
        notes.append("no impression section")
    if not findings:
        notes.append("no findings section")
    return ParsedReport(findings=findings, impression=impression, notes=tuple(notes))


def degeneracy(text: str) -> str | None:
    """Why `text` is not a report (empty, no letters, one word or phrase over and over), or None."""
    if not text.strip():
        return "the model wrote nothing"
    if not re.search(r"[^\W\d_]", text):
        return "the model wrote no letters"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 8:
        for n in (1, 2, 3, 4):
            grams = Counter(tuple(words[i : i + n]) for i in range(0, len(words) - n + 1))
            gram, count = grams.most_common(1)[0]
            if count >= 4 and count * n / len(words) > _DEGENERATE_SHARE:
                return f"degenerate output: {' '.join(gram)!r} repeated {count} times"
    compact = re.sub(r"\s+", "", text)
    if len(compact) >= 40:
        cycle = re.search(r"(.{1,16}?)\1{5,}", compact)
        if cycle and len(cycle.group(0)) > _DEGENERATE_SHARE * len(compact):
            return f"degenerate output: {cycle.group(1)!r} repeated"
    return None


def _tidy(section: str) -> str:
    """Strip markdown emphasis and list debris left around a section, keep its line breaks."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in section.strip(" \t\n*_:").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- the result ----------------------------------------------------------------------------------

MAX_RESULT_TEXT = 100_000  # characters of findings, impression or raw text; the node bounds more
MAX_REASON = 1000
MAX_NOTES = 64
_LIMITED = ConfigDict(extra="forbid", frozen=True, strict=True)
Text = Annotated[str, StringConstraints(max_length=MAX_RESULT_TEXT)]
Note = Annotated[str, StringConstraints(max_length=MAX_REASON)]


class Timings(BaseModel):
    """How the batch that drafted a request went, for metrics and the audit trail."""

    model_config = _LIMITED

    generate_seconds: float = Field(ge=0, le=86_400)
    batch_size: int = Field(ge=0, le=1024)  # requests generated together (0: none could run)
    new_tokens: int = Field(ge=0, le=1_000_000)
    worker: str = Field(max_length=255)
    device: str = Field(max_length=64)


class DraftResult(BaseModel):
    """One request's result: the draft's sections, or why there is none, and who wrote it.

    ``model`` is the worker's report of its model; the node checks it and names its own.
    """

    model_config = _LIMITED

    request_id: str = Field(min_length=1, max_length=128)
    ok: bool
    findings: Text
    impression: Text
    reason: Note | None
    text: Text
    notes: list[Note] = Field(max_length=MAX_NOTES)
    model: ModelIdentity
    timings: Timings

    @model_validator(mode="after")
    def _outcome(self) -> DraftResult:
        if self.ok and self.reason is not None:
            raise ValueError("no reason with ok: true (a draft)")
        if not self.ok and not (self.reason or "").strip():
            raise ValueError("a reason with ok: false (a failed result says why)")
        return self


class ContractError(ValueError):
    """A result that is not a DraftResult; the message names the first bad field, never a value."""


def parse_result(value: Any) -> DraftResult:
    """``value`` checked against the contract (raises ContractError)."""
    try:
        return DraftResult.model_validate(value)
    except ValidationError as exc:
        raise ContractError(contract_problem(exc, "result")) from None


def contract_problem(exc: ValidationError, root: str) -> str:
    """The first problem as ``root.field[i].key: what was expected``, plus how many more."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
    if first["msg"] != message:
        message = f"expected {message}"
    else:
        message = message[:1].lower() + message[1:]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def read_results(value: Any, request_ids: Collection[str]) -> dict[str, DraftResult | str]:
    """A task's result for the requests it carried: each one's DraftResult, or why there is none.

    A worker answers with one result per request. A result that breaks the contract fails only its
    own request; a task result that is not a list of about that many fails them all.
    """
    expected = set(request_ids)
    if not isinstance(value, list):
        why = f"the task's result is not a list of results (it is {type(value).__name__})"
        return dict.fromkeys(expected, why)
    if len(value) > 2 * len(expected) + 8:
        return dict.fromkeys(expected, f"the task's result has {len(value)} results for "
                                       f"{len(expected)} request(s)")
    found: dict[str, DraftResult | str] = {}
    for item in value:
        request_id = item.get("request_id") if isinstance(item, dict) else None
        if not isinstance(request_id, str) or request_id not in expected:
            continue  # cannot be told apart from noise: its request gets "no result" below
        if request_id in found:
            found[request_id] = "the worker returned two results for it"
            continue
        try:
            found[request_id] = parse_result(item)
        except ContractError as exc:
            found[request_id] = f"the worker's result breaks the contract: {exc}"
    return {rid: found.get(rid, "the worker returned no result for it") for rid in expected}

