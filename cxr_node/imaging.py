"""Stored chest X-ray DICOMs -> model-ready 8-bit grayscale images.

The node does all DICOM work so that a worker receives only pixels and a view name: this module
chooses which images of a study the model sees (one frontal, optionally one lateral), decodes them
whatever transfer syntax ingest accepted, and renders them the way a radiologist's viewer would
(modality LUT, VOI LUT or window, polarity) so that bone and dense tissue are white.

Every failure caused by the input (a corrupt codestream, a truncated file, a colour image) is an
`ImagingError` whose text an admin can act on and which names no patient.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

log = structlog.get_logger(__name__)

# Percentiles of the robust window used when a file has no VOI LUT and no window: wide enough to
# keep lung detail, narrow enough that a few saturated pixels (markers, wires) do not flatten it.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)
# Fraction cut from each edge before measuring the robust window, so that the collimated border
# (blank, unexposed film) does not take a share of the grey levels.
COLLIMATION_MARGIN = 0.1

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


def select_images(candidates: Sequence[Candidate], max_side: int, max_images: int = 2) -> Selection:
    """Choose and prepare the frontal (and lateral) image of a study.

    Frontal preference is PA, then AP, then an image of unknown view; within a view the highest
    Instance Number wins, because a repeated exposure is taken when the first one was unusable.
    A candidate that fails to prepare is replaced by the next one of the same role.
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
    frontal = _first_usable(frontal_order, max_side, failures)
    if frontal is None:
        raise ImagingError(_no_frontal_reason(candidates, frontal_order, failures))
    if frontal[1].view is View.UNKNOWN:
        log.warning(
            "imaging.frontal_view_unknown",
            sop_instance_uid=frontal[1].sop_instance_uid,
            reason="no PA or AP image could be used; an unknown-view image is sent as frontal",
        )
    chosen = [frontal]
    if max_images >= 2:
        lateral = _first_usable(_ranked(candidates, View.LATERAL), max_side, failures)
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
        log.info("imaging.candidate_dropped", sop_instance_uid=uid, reason=reason)
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
    ordered: Sequence[Candidate], max_side: int, failures: dict[str, str]
) -> tuple[ModelImage, Candidate] | None:
    """Prepare candidates in order until one works; each failure's reason goes into `failures`."""
    for candidate in ordered:
        try:
            pixels = prepare(candidate.path, max_side)
        except ImagingError as exc:
            failures[candidate.sop_instance_uid] = str(exc)
            log.warning(
                "imaging.prepare_failed",
                sop_instance_uid=candidate.sop_instance_uid,
                reason=str(exc),
            )
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
        for c in frontal_order
    )
    return f"no frontal image could be prepared: {tried}"


def _label(view: View) -> str:
    return _LABELS[view]


def prepare(path: Path, max_side: int) -> np.ndarray:
    """Decode one stored single-frame grayscale image into model pixels.

    Returns a 2-D uint8 array in display polarity (bone white), its longest side at most
    `max_side` (never enlarged), aspect ratio kept.
    """
    _require_positive("max_side", max_side)
    with _failing_as("not readable as DICOM"):
        ds = pydicom.dcmread(path, force=True)
    with _failing_as("unusable image header"):
        syntax = _ensure_transfer_syntax(ds)
        _check_single_grayscale_frame(ds)
    with _failing_as(f"pixel data cannot be decoded ({syntax.name})"):
        stored = ds.pixel_array
    if stored.ndim != 2:
        raise ImagingError(
            f"decoded pixel data has shape {stored.shape}, expected one grayscale frame"
        )
    if stored.min() == stored.max():
        raise ImagingError(f"blank image: every pixel has the value {stored.min()}")
    with _failing_as("grayscale transform failed"):
        unit = _voi_unit(apply_modality_lut(stored, ds), ds)
        if _displays_inverted(ds):
            unit = 1.0 - unit
    return _shrink(unit, max_side)


@contextmanager
def _failing_as(step: str) -> Iterator[None]:
    """Turn whatever a library raises on bad input into an ImagingError that names the step."""
    try:
        yield
    except ImagingError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types on corrupt input
        raise ImagingError(f"{step}: {' '.join(str(exc).split()) or type(exc).__name__}") from exc


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    """Files without a File Meta header (ACR-NEMA style) get the syntax they were read with."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        syntax = _SYNTAX_OF_ENCODING.get(ds.original_encoding, ImplicitVRLittleEndian)
        ds.file_meta.TransferSyntaxUID = syntax
    return UID(syntax)


def _check_single_grayscale_frame(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise ImagingError("no Pixel Data: not an image, or the file is truncated")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise ImagingError(
            f"colour image (Samples per Pixel {samples}); only grayscale radiographs can be used"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImagingError(
            f"multi-frame image ({frames} frames); only single-frame radiographs can be used"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(
            f"Photometric Interpretation {photometric or '(missing)'} is not grayscale"
        )


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
    # Clip to the LUT's inputs first: pydicom indexes through uint16, where larger values wrap.
    indices = np.clip(np.rint(values), inputs[0], inputs[-1]).astype(np.int64)
    return _scaled(apply_voi(indices, ds, index=0), low, high)


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
    """Map low..high to 0..1, clipping outside: the linear core of every VOI stage here."""
    unit: np.ndarray = np.clip((values - low) / (high - low), 0.0, 1.0)
    return unit.astype(np.float32)


def _robust_window(values: np.ndarray) -> tuple[float, float]:
    """Percentile window over the anatomy rather than the collimated border.

    Two cheap cuts: the outer margin of the image (a collimator edge near the film border), and
    the pixels at the extreme values of what remains (a shutter mask written as one constant).
    """
    rows, columns = values.shape
    dy, dx = int(rows * COLLIMATION_MARGIN), int(columns * COLLIMATION_MARGIN)
    centre = values[dy : rows - dy, dx : columns - dx]
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
