"""The preliminary AI draft as a DICOM Structured Report, filed in the images' own study.

The worker hands back text (a DraftResult, workers/payload.py); the queue stage puts beside it the
model identity the node vouches for (cxr_node/identity.py), never the worker's own claim. This
module turns them, plus the stored source images, into a Comprehensive SR (SOP class 1.2.840.10008.5.1.4.1.1.88.33) in the shape of TID 2000
"Basic Diagnostic Imaging Report", marked PARTIAL / UNVERIFIED / PRELIMINARY so that no system can
take it for a signed report.

Document tree (kept within Basic Text SR value types, so Basic Text stays an option)::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")        template 2000
      HAS CONCEPT MOD  CODE  Language of Content (TID 1204)    English
      HAS OBS CONTEXT  CODE  Observer Type = Device (TID 1002), then TID 1004: UIDREF Device
                       Observer UID; TEXT name, manufacturer, model name, serial number
      CONTAINS CONTAINER (121106, DCM, "Comment")               the disclaimer, shown first
        TEXT Comment  "AI-generated preliminary draft — not reviewed by a radiologist"
        TEXT Comment  "DEMO MODEL — not a clinical report"      (demo models only)
        TEXT Comment  supersedes / omitted source values        (when they apply)
      CONTAINS CONTAINER (59776-5, LN, "Findings")
        TEXT (121071, DCM, "Finding")
      CONTAINS CONTAINER (19005-8, LN, "Impressions")            left out when the impression is ""
        TEXT (121073, DCM, "Impression")

Headings are the LOINC codes that CID 7001 now prefers; readers should also accept the older DCM
121070 / 121072. The disclaimer sits in a heading of its own because TID 2000 allows only headings
at the root; DCM "Comment" comes from outside the baseline CIDs 7001/7002, which baseline groups
permit. TID 2000 is non-extensible, so the algorithm's identity is not a TID 4019 inside the tree:
it is the device observer (serial number = weights fingerprint), General Equipment
(ManufacturerModelName = model name, SoftwareVersions = model version, adapter if any, cxr-node
version, DeviceSerialNumber = fingerprint), an AuthorObserverSequence item (DEV, DeviceUID; the
Identified Person or Device macro has no serial number) and a ContributingEquipmentSequence item.
DICOM has no "Processing Algorithm" purpose code, so that item uses (109102, DCM, "Processing
Equipment") and says "Processing algorithm: ..." in its ContributionDescription.

UIDs are derived, never random, so a re-send of the same draft is the same instance:
SOP Instance UID from (study, sorted source SOP Instance UIDs, each source file's sha256, model
fingerprint, revision); Series Instance UID from (study, series number, UID root), shared by all
drafts of a study; Device Observer UID from the model fingerprint. InstanceNumber is the revision.
Rebuilding gives the same UIDs but new creation and content times: re-send the written file.

Source values (the rule for values the images carry, valid DICOM or not, e.g. an export whose
AccessionNumber has 56 characters where SH allows 16 and whose birth date is a hash):

* Values that file the report beside its images are copied from the images unchanged, also when
  they are not valid for their VR (too long, control characters, a backslash that makes two
  values, a malformed person name): PatientID, IssuerOfPatientID, PatientName, AccessionNumber
  (IDENTIFYING). The PACS filed the images under these values; a draft under repaired ones
  would be filed elsewhere, or refused. Unchanged means the same text: no
  truncation, no repair, no re-formatting, in the element of the dictionary VR. The SR is
  ISO_IR 192, so a value from a source in another Specific Character Set is decoded with that
  character set and written as the same text in UTF-8 (a Latin-1 "Müller" arrives as "Müller").
  Bytes above 0x7F with no character set that defines them (none declared, or only the default
  repertoire) are read as ISO 8859-1, as pydicom and Orthanc read them, and count as not
  conformant. The UIDs that tie the draft to the study (StudyInstanceUID, and the Series and SOP
  Instance UIDs of the evidence) are copied unchanged too, and are valid: the receiver refuses
  (0xC000) an image whose UIDs break PS3.5, and this stage refuses one as well.
* The draft fails (ReportError naming the image by its handle, never the file name, which can hold
  a UID, nor the value) only where no unchanged copy exists: bytes that are not text in the
  declared character set (the text is unknown, and a guess would be another identifier), a
  Specific Character Set DICOM does not define, or a value longer than MAX_INHERITED_CHARACTERS
  (no PACS files an identifier that long: it is an attack, not an export). Study Instance UID,
  Patient ID and Issuer must also agree across all images: a draft never mixes two patients.
* Each identifying value that is not conformant is said, never repeated: a
  ``report.inherited_nonconformant`` warning (attribute, VR, reason, image handle), a line in the
  report's Comment section, ``inherited_nonconformant(sr)``, the study's reason in `cxr-node
  status` ("draft SR built; source values not valid DICOM, copied unchanged: AccessionNumber (SH):
  56 characters, at most 16", kept once it is sent) and the ``nonconformant_source_values`` of its
  ``study.reported`` audit record. dciodvfy reports errors on those values and on nothing else.
* Everything the node writes itself stays conformant: write_sr checks every value against its VR
  and lets through only the top-level elements build_draft_sr copied unchanged, each while it
  holds exactly the source's value (by keyword, VR and value, not by switching checks off), so a
  bad configured institution name, a control character in the text or another over-long
  accession still stops the SR before anything is written. A rendition carries the same inherited
  values and is checked against its SR's record.
* Optional descriptive values (PatientBirthDate, PatientSex, StudyDate, StudyTime, StudyID,
  ReferringPhysicianName, StudyDescription) that are not valid are left empty (Type 2) or out
  (Type 3), never rewritten. Each omission is logged (``report.source_value_omitted``: attribute
  and reason, no value) and listed in the report's Comment section, so the reader knows the SR
  differs from the image on purpose; a hashed birth date is not a date and is left out.

Model text is normalised once, in DraftReport: outer whitespace is stripped (DICOM drops trailing
spaces on reading anyway) and each TAB becomes a space (text VRs allow only CR, LF and FF as
control characters); any other control character is refused. What remains round-trips byte for
byte through ISO_IR 192 (UTF-8), which every SR declares whatever the source's character set.
Findings and impression together are at most ``limits.max_draft_characters``, and text that
imitates a signature or a final status ("Electronically signed", "FINAL REPORT", "verified by",
an addendum: SIGN_OFF_CUES) is refused, so the study fails with the cue named and no SR claims to
be more than a machine draft.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import structlog
from highdicom.sr import (
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    LanguageOfContentItemAndDescendants,
    ObserverContext,
    TextContentItem,
)
from pydantic import ValidationError
from pydicom import config as pydicom_config
from pydicom.charset import default_encoding, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from pydicom.valuerep import MAX_VALUE_LEN, VALIDATORS

from cxr_node import __version__, audit, renditions
from cxr_node.config import Config, LimitsConfig, ReportConfig
from cxr_node.durable import write_atomic
from cxr_node.identity import DEMO_LABEL, ModelIdentity
from cxr_node.store import Store, Study, StudyState, instance_handle
from workers.payload import ContractError, DraftResult, contract_problem, parse_result

log = structlog.get_logger(__name__)

CHARACTER_SET = "ISO_IR 192"
DOCUMENT_TITLE = codes.LN.DiagnosticImagingReport  # (18748-4, LN, "Diagnostic Imaging Report")
FINDINGS = codes.LN.Findings  # (59776-5, LN, "Findings")
IMPRESSIONS = codes.LN.Impressions  # (19005-8, LN, "Impressions")
COMMENT = codes.DCM.Comment  # (121106, DCM, "Comment")
ENGLISH = CodedConcept("en", "RFC5646", "English")

DISCLAIMER = "AI-generated preliminary draft — not reviewed by a radiologist"
DEMO_DISCLAIMER = "DEMO MODEL — not a clinical report"
SERIES_LABEL = "AI DRAFT — NOT VERIFIED"
COMPLETION_DESCRIPTION = "Machine-generated draft; requires radiologist review"
DEMO_COMPLETION_DESCRIPTION = "DEMO MODEL, not a clinical report; machine-generated draft"

# Copied from the images unchanged, valid or not: the PACS filed the images under these values.
IDENTIFYING = ("PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber")
# Longer than any identifier a PACS files (a PN is at most 3 groups of 64 characters).
MAX_INHERITED_CHARACTERS = 1024
# How the study's reason (and `cxr-node status`) introduces the values copied unchanged.
NONCONFORMANT_NOTE = "source values not valid DICOM, copied unchanged: "
# Must be equal on every source image: a draft describes one patient's one study.
MUST_AGREE = ("StudyInstanceUID", "PatientID", "IssuerOfPatientID")
# Copied when valid, left empty (Type 2) or out (Type 3) when not.
OPTIONAL = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)
TYPE_2 = {"PatientID", "PatientName", "AccessionNumber", "PatientBirthDate", "PatientSex",
          "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName"}  # fmt: skip
PATIENT_SEXES = {"M", "F", "O", ""}
STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
              "UI", "UR", "UT"}  # fmt: skip
TEXT_VRS = {"LT", "ST", "UT"}  # may hold CR, LF, FF and backslashes
# Text VRs allow CR, LF and FF; TAB is rewritten to a space; every other control is refused.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
# Embeddings, overrides and isolates reorder how text is shown (the PDF, a viewer), so that it
# reads differently from what it says; right-to-left scripts need none of them.
DIRECTION_CONTROL = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
ESC = b"\x1b"  # starts an ISO 2022 escape sequence: a change of character set inside a value


DEFAULT_MAX_DRAFT_CHARACTERS: int = LimitsConfig.model_fields["max_draft_characters"].default


class ReportError(Exception):
    """The draft cannot become an SR; the message says why, without patient identifiers."""


@dataclass(frozen=True)
class Inherited:
    """An identifying value the SR carries unchanged from the images although it is not valid for
    its VR. ``note`` says what is wrong and never shows ``value``, which only write_sr compares."""

    keyword: str
    vr: str
    reason: str
    value: Any = field(repr=False)

    def __post_init__(self) -> None:
        if self.keyword not in IDENTIFYING:
            raise ValueError(f"keyword: only {IDENTIFYING} are copied unchanged, not "
                             f"{self.keyword!r}")

    @property
    def note(self) -> str:
        return f"{self.keyword} ({self.vr}): {self.reason}"


_INHERITED = "_inherited_nonconformant"  # where build_draft_sr records them on the SR dataset


def inherited_nonconformant(ds: Dataset) -> tuple[Inherited, ...]:
    """The values build_draft_sr copied into ``ds`` unchanged although they are not valid DICOM."""
    return getattr(ds, _INHERITED, ())


def draft_note(history: Iterable[Mapping[str, Any]], revision: int) -> str | None:
    """What the report stage said about the source values of the draft of ``revision``, if
    anything: the note of its first move to 'reported' in the study's ``history`` (transitions
    rows), which the study keeps once the draft is sent, also after a dead letter and a requeue."""
    for step in history:
        if step["revision"] == revision and step["state"] == StudyState.REPORTED:
            reason = step["reason"] or ""
            at = reason.find(NONCONFORMANT_NOTE)
            return reason[at:] if at >= 0 else None
    return None


@dataclass(frozen=True)
class DraftReport:
    """The model's Findings and Impression, normalised to text that survives DICOM unchanged, and
    checked to be what a preliminary draft may say: at most ``max_characters`` together, and no
    wording that imitates a signature or a final status (SIGN_OFF_CUES)."""

    findings: str
    impression: str
    model: ModelIdentity
    max_characters: int = field(default=DEFAULT_MAX_DRAFT_CHARACTERS, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", _clean_text("findings", self.findings))
        object.__setattr__(self, "impression", _clean_text("impression", self.impression))
        if not self.findings:
            raise ReportError("findings: empty; a draft needs findings text")
        if not isinstance(self.model, ModelIdentity):
            raise ReportError("model: expected a ModelIdentity")
        length = len(self.findings) + len(self.impression)
        if length > self.max_characters:
            raise ReportError(
                f"findings and impression: {length} characters, more than "
                f"limits.max_draft_characters ({self.max_characters})"
            )
        for where in ("findings", "impression"):
            _refuse_sign_off(where, getattr(self, where))

    @classmethod
    def from_result(
        cls, result: DraftResult | Mapping[str, Any],
        max_characters: int = DEFAULT_MAX_DRAFT_CHARACTERS,
    ) -> DraftReport:
        """The draft in a worker's result (checked against the contract if it is not yet a
        DraftResult); raise ReportError naming the first bad field. The result's ``model`` is
        used as it is: the queue stage has already put the node's identity there."""
        if not isinstance(result, DraftResult):
            try:
                result = parse_result(result)
            except ContractError as exc:
                raise ReportError(str(exc)) from None
        if not result.ok:
            raise ReportError("result.ok: the worker reported a failure; there is no draft")
        return cls(result.findings, result.impression, result.model, max_characters)


# Wording that would make a machine draft pass for a signed or final report. Each is specific
# enough that real report prose does not trip it ("no final diagnosis", "finally", "signs of"):
# none fires on the 7,346 findings and impression sections of the Indiana University reports.
SIGN_OFF_CUES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, flags))
    for name, pattern, flags in (
        ("a signature", r"\b(?:electronically|digitally)\s+signed\b|\be-?signed\b"
                        r"|\bsigned\s*(?:by\b|off\b|:)|\bsignature\s*:|(?:^|\s)/s/\s*\w", re.I),
        ("a final status", r"\bfinal\s+(?:report|read|version|result)\b|\bfinali[sz]ed\b"
                           r"|\bstatus\s*[:-]\s*(?:final|verified|signed|approved|completed?)\b",
         re.I),
        ("a verification", r"\b(?:verified|approved|attested|authenticated|countersigned)\s+by\b"
                           r"|\bi\s+have\s+(?:personally\s+)?(?:reviewed|examined)\b"
                           r"|\bi\s+(?:agree|concur)\s+with\b", re.I),
        ("a dictation", r"\b(?:dictated|transcribed)\s*(?:by\b|on\b|:)", re.I),
        ("a reading physician", r"\battending\s+(?:radiologist|physician)\b"
                                r"|\b(?:radiologist|attending|(?:reading|interpreting)\s+physician)"
                                r"\s*:", re.I),
        ("an addendum", r"\baddend(?:um|a)\b", re.I),
        ("an amended report", r"\b(?:amended|corrected|revised)\s+report\b", re.I),
        ("a physician's credentials",
         r"\b[A-Z][a-z]+,?\s+(?:M\.D\.|MD|D\.O\.|FRCR|FRCPC|FRANZCR|MBBS)(?!\w)", 0),
    )
)


def sign_off_cue(text: str) -> tuple[str, str, int] | None:
    """The first cue of a signature or final status in ``text``: (cue, words, position), or None.

    Matched after NFKC normalisation without format characters, so full-width letters or
    zero-width spaces do not hide a cue.
    """
    plain = "".join(c for c in unicodedata.normalize("NFKC", text)
                    if unicodedata.category(c) != "Cf")
    for name, pattern in SIGN_OFF_CUES:
        found = pattern.search(plain)
        if found:
            return name, " ".join(found.group().split())[:40], found.start()
    return None


def _refuse_sign_off(where: str, text: str) -> None:
    cue = sign_off_cue(text)
    if cue:
        name, words, position = cue
        raise ReportError(
            f"{where} imitates {name} ({words!r} at character {position}); an AI draft never "
            "claims to be signed, verified or final, so it is not filed"
        )


def build_draft_sr(
    images: Sequence[Path] | Mapping[str, Path],
    draft: DraftReport,
    settings: ReportConfig,
    *,
    supersedes: Path | None = None,
    revision: int = 1,
) -> Dataset:
    """The draft as a Comprehensive SR in the images' study, ready for write_sr.

    ``images`` are the stored Part-10 files of every image the model read (only their headers are
    read), as a list or as a mapping from a non-identifying handle such as "instance 12 (PA)" to
    the file: messages and log lines name an image by its handle, or by its position in the list
    ("source image 2"), never by its file name, which may hold a UID. ``supersedes`` is the earlier draft
    SR this one replaces; ``revision`` numbers the drafts of a study (InstanceNumber) and changes
    the SOP Instance UID.
    """
    if not isinstance(draft, DraftReport):
        raise ReportError("draft: expected a DraftReport")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ReportError(f"revision: expected a positive integer, got {revision!r}")
    if not images:
        raise ReportError("images: no source image; a draft must reference what the model read")
    named = (images.items() if isinstance(images, Mapping)
             else ((f"source image {n}", p) for n, p in enumerate(images, 1)))
    sources = sorted((_read_source(handle, Path(p)) for handle, p in named),
                     key=lambda s: s.sop_instance_uid)
    _check_distinct(sources)
    patient_study, omitted, inherited = _patient_and_study(sources)
    study_uid = sources[0].evidence.StudyInstanceUID
    predecessor = _read_predecessor(supersedes, sources[0], revision) if supersedes else None
    model = draft.model
    prefix = settings.uid_root or PYDICOM_ROOT_UID
    device_uid = derived_uid(prefix, "device-observer", model.fingerprint)
    sop_uid = derived_uid(
        prefix,
        "draft-sr",
        study_uid,
        *[part for s in sources for part in (s.sop_instance_uid, s.digest)],
        model.fingerprint,
        str(revision),
    )
    series_uid = derived_uid(
        prefix, "draft-series", study_uid, str(settings.series_number), settings.uid_root or ""
    )
    notices = [f"Source value left out: {name} ({why})." for name, why in omitted]
    notices += [f"Source value copied unchanged although not valid DICOM: {v.note}."
                for v in inherited]
    if predecessor is not None:
        notices.insert(0, _supersedes_text(predecessor))
    try:
        sr = ComprehensiveSR(
            evidence=_evidence_for_highdicom(sources),
            content=_document_tree(draft, settings, device_uid, notices),
            series_instance_uid=series_uid,
            series_number=settings.series_number,
            sop_instance_uid=sop_uid,
            instance_number=revision,
            manufacturer=settings.manufacturer,
            is_complete=False,
            is_final=False,
            is_verified=False,
            institution_name=settings.institution_name,
            previous_versions=[predecessor] if predecessor is not None else None,
            contributing_equipment=[_processing_equipment(model, settings)],
            specific_character_set=CHARACTER_SET,
            series_description=series_description(settings.series_description, model.demo),
            manufacturer_model_name=model.name,
            software_versions=_software_versions(model),
            device_serial_number=model.fingerprint,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"the SR could not be built: {type(exc).__name__}: {exc}") from exc
    sr.update(patient_study)
    setattr(sr, _INHERITED, tuple(inherited))
    sr.CompletionFlagDescription = (
        DEMO_COMPLETION_DESCRIPTION if model.demo else COMPLETION_DESCRIPTION
    )
    sr.AuthorObserverSequence = [_author_device(device_uid, model, settings)]
    log.info(
        "report.built",
        sources=len(sources),
        revision=revision,
        supersedes=predecessor is not None,
        omitted=[name for name, _ in omitted],
        inherited_nonconformant=[v.keyword for v in inherited],
        model=model.name,
        demo=model.demo,
    )
    return sr


def write_sr(ds: Dataset, path: Path, inherited: Iterable[Inherited] | None = None) -> None:
    """Write ``ds`` to ``path`` whole or not at all (temp file, fsync, rename, fsync dir), 0600.

    Every value is checked against its VR first and the file is encoded in memory, so an invalid
    value raises ReportError before anything exists on disk. ``inherited``: the source values
    ``ds`` may carry unchanged although not valid (check_values); by default those build_draft_sr
    recorded on ``ds`` (a rendition of a draft passes its SR's).
    """
    check_values(ds, inherited_nonconformant(ds) if inherited is None else inherited)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    write_atomic(Path(path), buffer.getvalue())


def series_description(configured: str, demo: bool) -> str:
    """SeriesDescription that says AI DRAFT — NOT VERIFIED (and DEMO MODEL first) in one LO.

    Only what the configured text does not already say is added. The labels are what a PACS
    series list shows, so they always fit: the configured text is shortened if it has to be. The
    limit is counted in UTF-8 bytes, as dciodvfy counts it (the standard counts characters).
    """
    said = configured.upper()
    head = f"{DEMO_LABEL} — " if demo and DEMO_LABEL not in said else ""
    says_ai_draft = re.search(r"\bAI\b", said) is not None and "DRAFT" in said
    if says_ai_draft and "NOT VERIFIED" in said:
        tail = ""
    elif says_ai_draft:
        tail = " — NOT VERIFIED"
    else:
        tail = f" — {SERIES_LABEL}"
    room = MAX_VALUE_LEN["LO"] - len((head + tail).encode())
    body = configured
    if len(body.encode()) > room:
        body = body.encode()[: room - len("…".encode())].decode(errors="ignore").rstrip() + "…"
    return head + body + tail


def invalid_reason(vr: str, value: Any) -> str | None:
    """Why ``value`` is not valid for ``vr``, in words that never repeat the value; None if valid.

    pydicom's validators check length and format; control characters, backslashes inside one
    value and over-long person names are checked here as well, because they also break an SR.
    """
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    for item in values:
        if item is None or item == "":
            continue
        if vr in STRING_VRS:
            item = text = str(item)  # IS, DS, PN objects are checked in their encoded form
            limit = MAX_VALUE_LEN.get(vr)
            if limit is not None and len(text) > limit:
                return f"{len(text)} characters, at most {limit}"
            allowed = "\r\n\f" if vr in TEXT_VRS else ""
            if any((c < " " or "\x7f" <= c <= "\x9f") and c not in allowed for c in text):
                return "contains control characters"
            if vr not in TEXT_VRS and "\\" in text:
                return "contains a backslash, the DICOM value separator"
            if vr == "PN" and _bad_person_name(text):
                return "not a valid PN value (at most 3 groups of 5 components, 64 characters each)"
        validator = VALIDATORS.get(vr)
        if validator is not None and not validator(vr, item)[0]:
            return f"not a valid {vr} value"
    return None


def _bad_person_name(text: str) -> bool:
    groups = text.split("=")
    return len(groups) > 3 or any(len(g) > 64 or g.count("^") > 4 for g in groups)


def check_values(ds: Dataset, inherited: Iterable[Inherited] = ()) -> None:
    """Raise ReportError naming the first attribute (at any depth) whose value breaks its VR.

    ``inherited`` lets through exactly the top-level elements that still hold the value, in the
    VR, that the source images gave them; every other element, in items too, is checked.
    """
    exempt = {v.keyword: (v.vr, v.value) for v in inherited}
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                check_values(item)
            continue
        if element.keyword in exempt and (element.VR, element.value) == exempt[element.keyword]:
            continue
        reason = invalid_reason(element.VR, element.value)
        if reason:
            name = element.keyword or str(element.tag)
            raise ReportError(f"the SR has an invalid {name} ({element.VR}): {reason}")


# --- source images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One source image: its header (for values) and a header-only evidence copy (for highdicom).

    ``name`` is the non-identifying handle messages use for it; ``raw`` holds the identifying
    values' bytes as the file has them, to tell whether their text is certain.
    """

    name: str
    header: Dataset
    evidence: Dataset
    sop_instance_uid: str
    digest: str
    raw: Mapping[str, bytes]


def _read_source(handle: str, path: Path) -> _Source:
    """Read one image header; its UIDs must be valid because the SR references them."""
    try:
        digest = _sha256(path)
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise ReportError(f"{handle}: cannot be read ({_why(exc, path)})") from exc
    # pydicom decodes a value when it is first used: take the bytes before anything uses them
    raw = {keyword: element.value for keyword in IDENTIFYING
           if isinstance(element := header.get_item(keyword), RawDataElement)
           and isinstance(element.value, bytes)}
    evidence = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = header.get(keyword)
        reason = "missing" if not value else invalid_reason("UI", value)
        if reason:
            raise ReportError(f"{handle}: {keyword} is {reason}")
        setattr(evidence, keyword, str(value))
    return _Source(handle, header, evidence, evidence.SOPInstanceUID, digest, raw)


def _why(exc: Exception, path: Path) -> str:
    """What went wrong reading ``path``, without its name: a spool file name holds a UID."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc).replace(str(path), "the file").replace(path.name, "the file")


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_distinct(sources: Sequence[_Source]) -> None:
    seen: dict[str, str] = {}
    for source in sources:
        if source.sop_instance_uid in seen:
            raise ReportError(
                f"{seen[source.sop_instance_uid]} and {source.name} are the same "
                "instance (same SOP Instance UID); list each image once"
            )
        seen[source.sop_instance_uid] = source.name


def _patient_and_study(
    sources: Sequence[_Source],
) -> tuple[Dataset, list[tuple[str, str]], list[Inherited]]:
    """The patient and study values the SR carries, taken from the first image.

    Returns them, the optional attributes left out as (keyword, reason), and the identifying
    values copied unchanged although not valid.
    """
    for keyword in MUST_AGREE:
        found = {str(s.header.get(keyword, "") or "") for s in sources}
        if len(found) > 1:
            names = ", ".join(s.name for s in sources)
            raise ReportError(
                f"source images disagree on {keyword} ({len(found)} different values among "
                f"{names}); one draft covers one study of one patient"
            )
    first = sources[0]
    merged = Dataset()
    inherited: list[Inherited] = []
    for keyword in IDENTIFYING:
        reasons = _identifying_problems(first, keyword)
        _copy(first.header, merged, keyword)
        if reasons:
            vr = dictionary_VR(keyword)
            inherited.append(Inherited(keyword, vr, "; ".join(reasons), merged[keyword].value))
            log.warning("report.inherited_nonconformant", attribute=keyword, vr=vr,
                        reason="; ".join(reasons), source=first.name)
    omitted: list[tuple[str, str]] = []
    for keyword in OPTIONAL:
        reason = _source_problem(first.header, keyword)
        if reason is None:
            _copy(first.header, merged, keyword)
            continue
        omitted.append((keyword, reason))
        log.warning(
            "report.source_value_omitted", attribute=keyword, reason=reason, source=first.name
        )
        if keyword in TYPE_2:
            setattr(merged, keyword, "")
    return merged, omitted, inherited


def _identifying_problems(source: _Source, keyword: str) -> list[str]:
    """What is not conformant about the source's value of ``keyword`` (empty: nothing).

    Raises ReportError when the value cannot be copied unchanged: its text is unknown, or it is
    too long to be an identifier.
    """
    value = source.header.get(keyword)
    if value in (None, ""):
        return []
    text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    if len(text) > MAX_INHERITED_CHARACTERS:
        raise ReportError(
            f"{source.name}: {keyword} has {len(text)} characters, more than the "
            f"{MAX_INHERITED_CHARACTERS} an identifier copied unchanged may have; it is neither "
            "shortened nor dropped: fix the source, or leave this study to the radiologist"
        )
    reasons = (_character_set_problem(source, keyword, text),
               _source_problem(source.header, keyword))
    return [r for r in reasons if r]


def _character_set_problem(source: _Source, keyword: str, text: str) -> str | None:
    """Whether ``text`` (pydicom's reading of the value) is certainly what the source's bytes say.

    None when it is: ASCII, or bytes that the declared Specific Character Set decodes exactly. A
    reason when bytes above 0x7F have no declared character set that defines them: read as
    ISO 8859-1. Raises ReportError when the text cannot be known.
    """
    raw = source.raw.get(keyword, b"")
    if raw.isascii() and ESC not in raw:
        return None
    declared = source.header.get("SpecificCharacterSet") or []
    terms = [str(t) for t in ([declared] if isinstance(declared, str) else declared)]
    unknown = [t for t in terms if t not in python_encoding]
    if unknown:
        shown = unknown[0] if invalid_reason("CS", unknown[0]) is None else "(not a code string)"
        raise ReportError(
            f"{source.name}: {keyword} cannot be read: Specific Character Set {shown} is not one "
            "DICOM defines, so its text is unknown and it is not copied: fix the source, or "
            "leave this study to the radiologist"
        )
    first = python_encoding[terms[0]] if terms else default_encoding
    try:
        if ESC in raw:  # ISO 2022: pydicom keeps what it could not decode, or replaces it
            if "\ufffd" in text or "\x1b" in text:
                raise UnicodeError
        elif first == default_encoding:  # the default repertoire is ASCII
            return ("bytes above 0x7F and no Specific Character Set that defines them "
                    "(read as ISO 8859-1)")
        else:
            raw.decode(first)
    except UnicodeError:
        declared_as = "\\".join(terms) or "none declared"  # as DICOM writes it: \ISO 2022 IR 87
        raise ReportError(
            f"{source.name}: {keyword} is not text in its character set ({declared_as}): "
            "its text is unknown, and a guess would be another identifier, so it is not "
            "copied: fix the source, or leave this study to the radiologist"
        ) from None
    return None


def _source_problem(header: Dataset, keyword: str) -> str | None:
    """Why the source's value of ``keyword`` is not valid for its VR as the SR writes it (the
    dictionary VR); None if it is."""
    if keyword not in header:
        return None
    value = header[keyword].value
    if isinstance(value, MultiValue) and len(value) > 1:
        return f"{len(value)} values where one is allowed"
    if keyword == "PatientSex" and value not in PATIENT_SEXES:
        return "not M, F or O"
    return invalid_reason(dictionary_VR(keyword), value)


def _copy(source: Dataset, target: Dataset, keyword: str) -> None:
    """Copy one attribute's value unchanged (as text: pydicom writes it in the SR's character
    set), in the element of its dictionary VR; a missing or empty Type 2 attribute becomes present
    and empty."""
    value = source[keyword].value if keyword in source else None
    if value in (None, ""):
        if keyword in TYPE_2:
            setattr(target, keyword, "")
        return
    # pydicom's own check would warn, and some of its warnings quote the value
    target.add(DataElement(tag_for_keyword(keyword), dictionary_VR(keyword), value,
                           validation_mode=pydicom_config.IGNORE))


def _evidence_for_highdicom(sources: Sequence[_Source]) -> list[Dataset]:
    """UID-only evidence; the first also has empty patient/study attributes, which highdicom reads.

    The real values are set on the SR afterwards, so highdicom neither checks nor warns about them
    (its warnings would repeat a patient's name).
    """
    first = Dataset()
    first.update(sources[0].evidence)
    for keyword in sorted(TYPE_2):
        setattr(first, keyword, "")
    return [first, *(s.evidence for s in sources[1:])]


def _read_predecessor(path: Path, source: _Source, revision: int) -> Dataset:
    """The earlier draft: an SR of the same study and patient, with a lower revision."""
    try:
        earlier = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise ReportError(f"the superseded draft cannot be read ({_why(exc, path)})") from exc
    if getattr(earlier, "Modality", None) != "SR" or "ContentSequence" not in earlier:
        raise ReportError("the superseded draft is not an SR document")
    for keyword in ("StudyInstanceUID", "PatientID"):
        if str(earlier.get(keyword, "")) != str(source.header.get(keyword, "")):
            raise ReportError(
                f"the superseded draft has a different {keyword} from the source images"
            )
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not earlier.get(keyword):
            raise ReportError(f"the superseded draft's {keyword} is missing")
    earlier_revision = int(earlier.get("InstanceNumber") or 0)
    if revision <= earlier_revision:
        raise ReportError(
            f"revision {revision} does not follow the superseded draft's revision "
            f"{earlier_revision}"
        )
    return earlier


def _supersedes_text(earlier: Dataset) -> str:
    revision = earlier.get("InstanceNumber")
    which = f" (revision {revision})" if revision else ""
    return (
        f"This draft supersedes the earlier AI draft{which}, SOP Instance UID "
        f"{earlier.SOPInstanceUID}; read this one instead."
    )


# --- document content ----------------------------------------------------------------------------


def _document_tree(
    draft: DraftReport, settings: ReportConfig, device_uid: str, notices: Iterable[str]
) -> ContainerContentItem:
    model = draft.model
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=model.name,
            manufacturer_name=settings.manufacturer,
            model_name=model.description,
            serial_number=model.fingerprint,
        ),
    )
    comments = [DEMO_DISCLAIMER, DISCLAIMER] if model.demo else [DISCLAIMER]
    sections = [
        _section(COMMENT, COMMENT, [*comments, *notices]),
        _section(FINDINGS, codes.DCM.Finding, [draft.findings]),
    ]
    if draft.impression:
        sections.append(_section(IMPRESSIONS, codes.DCM.Impression, [draft.impression]))
    root = ContainerContentItem(name=DOCUMENT_TITLE, template_id="2000")
    root.ContentSequence = ContentSequence(
        [*LanguageOfContentItemAndDescendants(ENGLISH), *observer, *sections]
    )
    return root


def _section(heading: Any, item_name: Any, texts: Iterable[str]) -> ContainerContentItem:
    section = ContainerContentItem(name=heading, relationship_type="CONTAINS")
    section.ContentSequence = ContentSequence(
        [TextContentItem(name=item_name, value=t, relationship_type="CONTAINS") for t in texts]
    )
    return section


def _software_versions(model: ModelIdentity) -> list[str]:
    """Model version, adapter (if any), then the node's own version."""
    adapter = [model.adapter] if model.adapter else []
    return [model.version, *adapter, f"cxr-node {__version__}"]


def _processing_equipment(model: ModelIdentity, settings: ReportConfig) -> hd.ContributingEquipment:
    description = f"Processing algorithm: {model.description}; weights sha256 {model.fingerprint}"
    return hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=_software_versions(model),
        device_serial_number=model.fingerprint,
        institution_name=settings.institution_name,
        contribution_description=description[: MAX_VALUE_LEN["ST"]],
    )


def _author_device(device_uid: str, model: ModelIdentity, settings: ReportConfig) -> Dataset:
    """AuthorObserverSequence item (Identified Person or Device macro) for the model as author."""
    item = Dataset()
    item.ObserverType = "DEV"
    item.DeviceUID = device_uid
    item.Manufacturer = settings.manufacturer
    item.ManufacturerModelName = model.name
    item.StationName = ""
    item.InstitutionName = settings.institution_name or ""
    item.InstitutionCodeSequence = []
    return item


def derived_uid(prefix: str, purpose: str, *parts: str) -> str:
    """A UID that depends on exactly these inputs (JSON keeps the parts from running together)."""
    return str(generate_uid(prefix=prefix, entropy_srcs=[json.dumps([purpose, *parts])]))


# --- draft text -----------------------------------------------------------------------------------


def _clean_text(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ReportError(f"{where}: expected a string, got {type(value).__name__}")
    text = value.replace("\t", " ").strip()
    bad = CONTROL.search(text)
    if bad:
        raise ReportError(
            f"{where}: control character U+{ord(bad.group()):04X} at position {bad.start()} "
            "is not allowed in DICOM text"
        )
    bad = DIRECTION_CONTROL.search(text)
    if bad:
        raise ReportError(
            f"{where}: text direction control U+{ord(bad.group()):04X} at position "
            f"{bad.start()} would make the text read differently from what it says"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ReportError(f"{where}: not encodable as UTF-8 at position {exc.start}") from exc
    return text


class Reporter:
    """The report stage: drafted -> reported. Builds the SR, files it, and fills the outbox.

    The SR file is written before the row that points at it, and the outbox rows and the state
    change are one transaction, so a crash leaves either no report or a report ready to send.
    """

    def __init__(self, config: Config, store: Store, outbox: Any, clock: Any = time.time):
        self.config = config
        self.store = store
        self.outbox = outbox
        self.clock = clock

    def step(self) -> int:
        done = 0
        for study in self.store.studies([StudyState.DRAFTED]):
            done += self._report(study)
        return done

    def _report(self, study: Study) -> int:
        job = self.store.db.execute(
            """SELECT * FROM jobs WHERE study_uid = ? AND revision = ? AND state = 'done'
               ORDER BY id DESC LIMIT 1""", (study.study_uid, study.revision)).fetchone()
        earlier = self.store.db.execute(
            "SELECT path FROM reports WHERE study_uid = ? AND revision < ? ORDER BY revision DESC "
            "LIMIT 1", (study.study_uid, study.revision)).fetchone()
        try:
            if job is None:
                raise ReportError("no finished draft for this revision")
            draft = DraftReport.from_result(DraftResult.model_validate_json(job["result"]),
                                            self.config.limits.max_draft_characters)
            images = {instance_handle(i["instance_id"], i["view"]): Path(i["path"])
                      for i in json.loads(job["inputs"])["images"]}
            ds = build_draft_sr(images, draft, self.config.report, revision=study.revision,
                                supersedes=Path(earlier["path"]) if earlier else None)
            path = self.config.reports_dir / study.study_key / f"{ds.SOPInstanceUID}.dcm"
            write_sr(ds, path)
            documents = self._renditions(ds, study)
        except (ReportError, ValidationError) as exc:
            if isinstance(exc, ValidationError):  # a job row this node wrote: never expected
                exc = ReportError(f"the stored draft is unreadable: {contract_problem(exc, 'result')}")
            if self.store.move(study, StudyState.FAILED, f"report not built: {exc}"):
                log.warning("study.state", study=study.study_key, state="failed", reason=str(exc))
                audit.study_state(study, StudyState.FAILED, f"report not built: {exc}")
            return 1
        nonconformant = [v.note for v in inherited_nonconformant(ds)]
        reason = f"draft SR {'supersedes an earlier draft' if earlier else 'built'}"
        if nonconformant:
            reason += f"; {NONCONFORMANT_NOTE}{'; '.join(nonconformant)}"
        with self.store.transaction() as db:
            if not self.store.transition(db, study, StudyState.REPORTED, reason=reason):
                return 0
            db.execute(
                """INSERT OR IGNORE INTO reports (sr_uid, study_uid, revision, job_id, path,
                   supersedes, demo, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (ds.SOPInstanceUID, study.study_uid, study.revision, job["id"], str(path),
                 earlier["path"] if earlier else None, int(draft.model.demo), self.clock()))
            db.executemany(
                """INSERT OR IGNORE INTO documents (sr_uid, rendition, study_uid, sop_instance_uid,
                   path, problem, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(ds.SOPInstanceUID, d.rendition, study.study_uid, d.uid,
                  str(d.path) if d.path else None, d.problem, self.clock()) for d in documents])
            self.outbox.enqueue(db, sr_uid=ds.SOPInstanceUID, study_uid=study.study_uid,
                                destinations=[d.name for d in self.config.destinations])
        log.info("study.state", study=study.study_key, revision=study.revision, state="reported",
                 reason=reason, demo=draft.model.demo, destinations=len(self.config.destinations))
        audit.study_state(study, StudyState.REPORTED, sr_uid=ds.SOPInstanceUID,
                          demo=draft.model.demo, supersedes=earlier is not None,
                          renditions=[d.rendition for d in documents if d.path] or None,
                          rendition_problems={d.rendition: d.problem for d in documents
                                              if d.problem} or None,
                          nonconformant_source_values=nonconformant or None,
                          destinations=[d.name for d in self.config.destinations])
        return 1

    def _renditions(self, sr: Dataset, study: Study) -> list[Rendered]:
        """Build and write the renditions some destination asks for.

        One that cannot be built (a character no configured font has, too many pages) is
        recorded with its reason: the destinations that asked for it get a dead letter saying
        so, the others get the draft all the same.
        """
        built = []
        for rendition in renditions.needed(self.config.destinations):
            builder = renditions.BUILDERS.get(rendition)
            try:
                if builder is None:
                    raise ReportError("this node cannot build it")
                document = builder(sr, self.config.report)
                path = self.config.reports_dir / study.study_key / f"{document.SOPInstanceUID}.dcm"
                write_sr(document, path, inherited_nonconformant(sr))  # the SR's identifiers
            except ReportError as exc:
                log.warning("report.rendition_failed", study=study.study_key, rendition=rendition,
                            reason=str(exc))
                built.append(Rendered(rendition, problem=str(exc)))
                continue
            built.append(Rendered(rendition, str(document.SOPInstanceUID), path))
        return built


@dataclass(frozen=True)
class Rendered:
    """A rendition of a draft: the file written, or why it could not be built."""

    rendition: str
    uid: str | None = None
    path: Path | None = None
    problem: str | None = None