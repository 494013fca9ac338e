"""Feedback: the radiologist's signed report, paired with the node's draft and scored.

Once the node is live, the signed report is the only ground truth that keeps coming. It arrives
three ways, and each becomes one row of the ``feedback`` table (store.py):

- a final SR sent by the PACS over C-STORE (``SignedReportInbox``, called by the receiver before
  any instance indexing: an SR is never an image of its study, opens no revision and is never
  drafted). The receiver only keeps it durably (bounded, UIDs checked, a confined path); this
  stage then reads it (``read_sr``): our own drafts echoed back (SOP Instance UID in ``reports``
  or ``documents``, our Manufacturer, our device observer) and SRs that are not VERIFIED and
  COMPLETE (or say PRELIMINARY) are ignored with the reason; the text is the Findings and
  Impressions (or Conclusions) headings of TID 2000, by LOINC or DCM code, else every TEXT item;
- an HL7 v2 ORU^R01 with result status F or C (feedback_hl7.py);
- `cxr-node feedback import FILE` (``read_import``).

Pairing (``Feedback``, the stage): a signed report is paired with the latest draft SR of the study
it names (Study Instance UID); else with the latest draft whose accession number is the one it
names, provided the patient IDs agree where both have one. A report without a draft waits for
one (``feedback.wait_days``), then counts as unpaired and its text is dropped. A later signed
report of the same draft (an addendum, a correction) supersedes the earlier pair. Each pair is
scored with the same scorer and labeler as `cxr-node eval` (cxr_node.evaluation): ReXrank's
BLEU-2 and pycocoevalcap's ROUGE-L of the whole signed text (findings and impression) against the
whole draft, both texts' 14 CheXpert-style labels, and the significant misses.

The signed text is PHI: it lives in the database only (never in a log line, a metric, the
status page or the audit trail), and goes with its study under the retention rules. What leaves
the node (metrics, the status page, `cxr-node feedback status`) is scores, labels' agreement
and study keys.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from cxr_node import audit
from cxr_node.config import Config, FeedbackConfig
from cxr_node.durable import OutsideRoot, confined, move_durably, private_dir
from cxr_node.evaluation import label, label_scores, report_scores, significant_misses
from cxr_node.logs import study_key
from cxr_node.part10 import CANNOT_UNDERSTAND, SUCCESS, Header, Rejected, uid_problem
from cxr_node.retention import DAY
from cxr_node.show import MAX_DEPTH, printable
from cxr_node.store import Store
from workers.payload import parse_report

log = structlog.get_logger("cxr_node.feedback")

SIGNED_REPORT_CLASSES = (BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage)
FINDINGS = {("59776-5", "LN"), ("121070", "DCM")}  # CID 7001 "Findings": LOINC, then DCM
IMPRESSIONS = {("19005-8", "LN"), ("121072", "DCM"),  # "Impressions"
               ("55110-1", "LN"), ("121076", "DCM")}  # "Conclusions"
DEVICE_OBSERVER_MANUFACTURER = ("121014", "DCM")
MAX_ITEMS = 10_000  # content items read from one SR: a report has tens
HOUSEKEEPING_SECONDS = 60.0
STRAY_FILE_SECONDS = 3600.0
"""A file in feedback/ that no row names (a crash between its row's update and its removal) goes
once it is this old; younger, it may be a receiver's file whose row is being written."""
RECENT = 50  # rows the status page and `feedback status` list
LABEL_F1 = ("label F1 micro (14)", "label F1 macro (14)", "label F1 micro (5 common)",
            "label F1 macro (5 common)")


class State(StrEnum):
    RECEIVED = "received"  # an SR kept by the receiver, not read yet
    WAITING = "waiting"  # a signed report without a draft (yet)
    PAIRED = "paired"
    SUPERSEDED = "superseded"  # a later signed report of the same draft replaced it
    IGNORED = "ignored"  # not a signed report, our own draft, no text, or another patient's order
    UNPAIRED = "unpaired"  # no draft within feedback.wait_days


class Ignored(Exception):
    """A document that is no signed report to measure a draft against; the message says why,
    without identifiers."""


@dataclass(frozen=True)
class SignedReport:
    """What a signed report says, as far as pairing and scoring need it."""

    source: str
    document: str
    findings: str
    impression: str
    study_uid: str | None = None
    accession: str | None = None
    patient_ids: tuple[str, ...] = ()


def joined(findings: str | None, impression: str | None) -> str:
    """The text a pair is scored on: findings, then impression."""
    return "\n".join(part for part in (findings, impression) if part)


def checked_text(findings: str, impression: str, settings: FeedbackConfig) -> tuple[str, str]:
    """The two sections, stripped; Ignored when there is no text or too much."""
    findings, impression = findings.strip(), impression.strip()
    length = len(findings) + len(impression)
    if not length:
        raise Ignored("no report text")
    if length > settings.max_text_characters:
        raise Ignored(f"{length} characters of text, more than feedback.max_text_characters "
                      f"({settings.max_text_characters})")
    return findings, impression


def sections_of(text: str) -> tuple[str, str]:
    """Free text split at FINDINGS / IMPRESSION headings, as the worker splits a model's text;
    without headings it is all findings."""
    parsed = parse_report(text)
    return (parsed.findings, parsed.impression) if parsed.ok else (text.strip(), "")


# --- a signed SR over C-STORE ----------------------------------------------------------------


class SignedReportInbox:
    """The receiver's branch for SR instances: keep the file durably for the feedback stage, in
    ``feedback/<study key>/<random>.dcm``, with a row in state ``received``; nothing else."""

    def __init__(self, config: Config, store: Store, fsync: bool = True):
        self.root = private_dir(config.feedback_dir)
        self.store = store
        self.fsync = fsync
        self.max_bytes = config.feedback.max_sr_kb << 10

    def keep(self, header: Header, received: Path, context: dict[str, str]) -> int:
        """Store a signed report's file and answer success; a re-send is acknowledged and dropped."""
        if header.size > self.max_bytes:
            raise Rejected(CANNOT_UNDERSTAND, "SR larger than feedback.max_sr_kb", keep=False)
        key = study_key(header.study_uid)
        if self._known(header.sop_instance_uid):
            return self._duplicate(header, received, key, context)
        path = confined(self.root / key / f"{secrets.token_hex(12)}.dcm", self.root)
        move_durably(received, path, fsync=self.fsync)
        try:
            with self.store.transaction() as db:
                row = db.execute(
                    """INSERT OR IGNORE INTO feedback (source, document, received_at, state,
                       study_uid, path) VALUES ('dicom', ?, ?, ?, ?, ?)""",
                    (header.sop_instance_uid, time.time(), State.RECEIVED, header.study_uid,
                     str(path)))
        except BaseException:
            path.unlink(missing_ok=True)  # not recorded, not acknowledged: the PACS sends it again
            raise
        if row.rowcount != 1:  # another association stored the same SR meanwhile
            path.unlink()
            return self._duplicate(header, path, key, context)
        log.info("feedback.received", source="dicom", study=key, feedback=row.lastrowid,
                 **context)
        audit.feedback_received("dicom", "received", header.study_uid, row.lastrowid,
                                document=header.sop_instance_uid, **context)
        return SUCCESS

    def _known(self, sop_instance_uid: str) -> bool:
        return self.store.db.execute(
            "SELECT 1 FROM feedback WHERE source = 'dicom' AND document = ?",
            (sop_instance_uid,)).fetchone() is not None

    def _duplicate(self, header: Header, received: Path, key: str,
                   context: dict[str, str]) -> int:
        received.unlink(missing_ok=True)
        log.info("feedback.duplicate", source="dicom", study=key, **context)
        audit.feedback_received("dicom", "duplicate", header.study_uid, None,
                                document=header.sop_instance_uid, **context)
        return SUCCESS


def read_sr(ds: Dataset, db: sqlite3.Connection, config: Config) -> SignedReport:
    """The signed report an SR holds; Ignored when it is ours, not signed, or has no text."""
    ours = _ours(ds, db, config.report.manufacturer)
    if ours:
        raise Ignored(ours)
    flags = {keyword: str(ds.get(keyword, "") or "(absent)")
             for keyword in ("VerificationFlag", "CompletionFlag", "PreliminaryFlag")}
    if (flags["VerificationFlag"] != "VERIFIED" or flags["CompletionFlag"] != "COMPLETE"
            or flags["PreliminaryFlag"] == "PRELIMINARY"):
        shown = ", ".join(f"{k} {printable(v[:16])}" for k, v in flags.items())
        raise Ignored(f"not a signed final report ({shown}): only VERIFIED and COMPLETE SRs "
                      "that do not say PRELIMINARY count")
    findings, impression = checked_text(*sr_text(ds), config.feedback)
    patient_id = _single(ds, "PatientID")
    return SignedReport("dicom", str(ds.SOPInstanceUID), findings, impression,
                        study_uid=str(ds.StudyInstanceUID),
                        accession=_single(ds, "AccessionNumber") or None,
                        patient_ids=(patient_id,) if patient_id else ())


def _ours(ds: Dataset, db: sqlite3.Connection, manufacturer: str) -> str | None:
    """Why ``ds`` is one of this node's own documents (echoed back by the PACS), or None."""
    uid = str(ds.get("SOPInstanceUID", ""))
    if db.execute("SELECT 1 FROM reports WHERE sr_uid = ? UNION ALL SELECT 1 FROM documents "
                  "WHERE sop_instance_uid = ?", (uid, uid)).fetchone():
        return "this node's own draft, sent back (its SOP Instance UID is one of our drafts)"
    if manufacturer and _single(ds, "Manufacturer") == manufacturer:
        return f"made by this node (Manufacturer is report.manufacturer {manufacturer!r})"
    for item in ds.get("ContentSequence") or []:
        if (item.get("RelationshipType") == "HAS OBS CONTEXT"
                and _code(item) == DEVICE_OBSERVER_MANUFACTURER
                and manufacturer and str(item.get("TextValue", "")) == manufacturer):
            return "made by this node (its device observer is report.manufacturer)"
    return None


def sr_text(ds: Dataset) -> tuple[str, str]:
    """Findings and impression of an SR's content tree: the text under TID 2000's Findings and
    Impressions (or Conclusions) headings, by LOINC or DCM code; without such headings, every
    TEXT item outside the observation context, as findings."""
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    everything: list[str] = []
    budget = [MAX_ITEMS]
    for item in _items(ds):
        heading = "findings" if _code(item) in FINDINGS else (
            "impression" if _code(item) in IMPRESSIONS else None)
        texts = list(_texts(item, 1, budget))
        everything += texts
        if heading:
            sections[heading] += texts
    if not sections["findings"] and not sections["impression"]:
        return "\n".join(everything), ""
    return "\n".join(sections["findings"]), "\n".join(sections["impression"])


def _texts(item: Dataset, depth: int, budget: list[int]) -> Iterator[str]:
    """The TEXT values of ``item`` and its descendants, in document order, outside observation
    context and concept modifiers; at most MAX_DEPTH levels and MAX_ITEMS items."""
    budget[0] -= 1
    if budget[0] < 0:
        raise Ignored(f"more than {MAX_ITEMS} content items")
    if depth > MAX_DEPTH:
        raise Ignored(f"content nested deeper than {MAX_DEPTH} levels")
    if item.get("RelationshipType") in ("HAS OBS CONTEXT", "HAS CONCEPT MOD"):
        return
    if item.get("ValueType") == "TEXT" and item.get("TextValue"):
        yield str(item.TextValue)
    for child in _items(item):
        yield from _texts(child, depth + 1, budget)


def _items(ds: Dataset) -> list[Dataset]:
    value = ds.get("ContentSequence") or []
    return [item for item in value if isinstance(item, Dataset)]


def _code(item: Dataset) -> tuple[str, str] | None:
    codes = item.get("ConceptNameCodeSequence") or []
    if not codes or not isinstance(codes[0], Dataset):
        return None
    return str(codes[0].get("CodeValue", "")), str(codes[0].get("CodingSchemeDesignator", ""))


def _single(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


# --- signed reports from HL7 and files ---------------------------------------------------------


def store_signed(store: Store, report: SignedReport, **context: Any) -> tuple[str, int | None]:
    """Keep a signed report to be paired: ("stored", its row) or ("duplicate", None) when the same
    document was received before."""
    with store.transaction() as db:
        row = db.execute(
            """INSERT OR IGNORE INTO feedback (source, document, received_at, state, study_uid,
               accession, patient_ids, findings, impression) VALUES (?,?,?,?,?,?,?,?,?)""",
            (report.source, report.document, time.time(), State.WAITING, report.study_uid,
             report.accession, json.dumps(report.patient_ids), report.findings,
             report.impression))
    outcome, feedback_id = ("stored", row.lastrowid) if row.rowcount == 1 else ("duplicate", None)
    log.info(f"feedback.{outcome}", source=report.source, feedback=feedback_id,
             study=study_key(report.study_uid) if report.study_uid else None, **context)
    audit.feedback_received(report.source, outcome, report.study_uid, feedback_id,
                            document=report.document, **context)
    return outcome, feedback_id


class Mismatch(Exception):
    """The report's order number is a draft's, but of another patient."""


def draft_of(db: sqlite3.Connection, study_uid: str | None, accession: str | None,
             patient_ids: Sequence[str]) -> sqlite3.Row | None:
    """The draft a signed report pairs with (``reports`` row): the latest of its study; else the
    latest of its accession number whose patient ID is one of ``patient_ids`` (when both sides
    have one). Mismatch when drafts have that accession number, each of another patient."""
    if study_uid:
        row = db.execute("""SELECT sr_uid, study_uid, path, demo FROM reports WHERE study_uid = ?
                            ORDER BY revision DESC LIMIT 1""", (study_uid,)).fetchone()
        if row is not None:
            return row
    if not accession:
        return None
    rows = db.execute(
        """SELECT r.sr_uid, r.study_uid, r.path, r.demo, d.patient_id FROM draft_orders d
           JOIN reports r ON r.sr_uid = d.sr_uid WHERE d.accession = ?
           ORDER BY r.created_at DESC""", (accession,)).fetchall()
    for row in rows:
        if not patient_ids or not row["patient_id"] or row["patient_id"] in patient_ids:
            return row
    if rows:
        raise Mismatch("its order number is that of a draft of another patient (the patient "
                       "IDs differ)")
    return None


MAX_IMPORT_LINE_BYTES = 1 << 20
MAX_IMPORT_RECORDS = 100_000
MAX_STUDY_CHARS = 64


def read_import(path: Path, settings: FeedbackConfig) -> Iterator[tuple[int, str, str] | str]:
    """(line, study, text) for each record of a JSONL or CSV file of {study, text}, or a problem
    naming the line. ``study`` is a Study Instance UID, a study key or an accession number."""
    with path.open("rb") as stream:
        if path.suffix.lower() == ".csv":
            yield from _csv_records(stream, path, settings)
        else:
            yield from _jsonl_records(stream, path, settings)


def _jsonl_records(stream: io.BufferedReader, path: Path,
                   settings: FeedbackConfig) -> Iterator[tuple[int, str, str] | str]:
    for number, line in enumerate(iter(lambda: stream.readline(MAX_IMPORT_LINE_BYTES + 1), b""),
                                  1):
        if number > MAX_IMPORT_RECORDS:
            yield f"{path}:{number}: more than {MAX_IMPORT_RECORDS} lines; split the file"
            return
        if len(line) > MAX_IMPORT_LINE_BYTES:
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_IMPORT_LINE_BYTES)
            yield f"{path}:{number}: longer than {MAX_IMPORT_LINE_BYTES} bytes"
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            yield f"{path}:{number}: not one JSON object in UTF-8"
            continue
        yield _record(value, f"{path}:{number}", number, settings)


def _csv_records(stream: io.BufferedReader, path: Path,
                 settings: FeedbackConfig) -> Iterator[tuple[int, str, str] | str]:
    csv.field_size_limit(MAX_IMPORT_LINE_BYTES)
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    try:
        for number, value in enumerate(csv.DictReader(text), 2):
            if number > MAX_IMPORT_RECORDS:
                yield f"{path}:{number}: more than {MAX_IMPORT_RECORDS} records; split the file"
                return
            yield _record(value, f"{path}: record {number - 1}", number, settings)
    except (UnicodeDecodeError, csv.Error) as exc:
        yield f"{path}: not CSV in UTF-8 with a header row study,text ({type(exc).__name__})"


def _record(value: Any, where: str, number: int,
            settings: FeedbackConfig) -> tuple[int, str, str] | str:
    if not isinstance(value, dict):
        return f'{where}: expected {{"study": ..., "text": ...}}'
    study, text = value.get("study"), value.get("text")
    if not isinstance(study, str) or not study.strip() or len(study.strip()) > MAX_STUDY_CHARS \
            or not study.strip().isprintable():
        return (f'{where}: "study" must be a Study Instance UID, a study key or an accession '
                f"number (1 to {MAX_STUDY_CHARS} printable characters)")
    if not isinstance(text, str) or not text.strip():
        return f'{where}: "text" must be the signed report\'s text'
    if len(text) > settings.max_text_characters:
        return f'{where}: "text" longer than feedback.max_text_characters'
    return number, study.strip(), text


def imported(db: sqlite3.Connection, study: str, text: str) -> SignedReport:
    """An imported line as a signed report, its study resolved: a study key or UID the node
    knows, else an accession number of a draft; a value it does not know yet is kept as both a
    UID (when it is one) and an accession number, whichever a draft will have."""
    document = hashlib.sha256(f"{study}\n{text}".encode()).hexdigest()[:32]
    findings, impression = sections_of(text)
    row = db.execute("SELECT study_uid FROM studies WHERE study_key = ? OR study_uid = ?",
                     (study, study)).fetchone() or db.execute(
        "SELECT study_uid FROM reports WHERE study_uid = ?", (study,)).fetchone()
    if row:
        return SignedReport("import", document, findings, impression, study_uid=row[0])
    known_order = db.execute("SELECT 1 FROM draft_orders WHERE accession = ?",
                             (study,)).fetchone()
    uid = None if known_order or uid_problem(study) else study
    return SignedReport("import", document, findings, impression, study_uid=uid,
                        accession=study)


# --- the stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftText:
    sr_uid: str
    study_uid: str
    text: str
    model: str
    demo: bool


class Feedback:
    """The feedback stage: reads received SRs, indexes new drafts by accession, pairs waiting
    signed reports with their drafts and scores them; once a minute, gives up on reports that
    waited ``feedback.wait_days`` and removes stray files."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self.config = config
        self.settings = config.feedback
        self.store = store
        self.clock = clock
        self._indexed_until = 0.0  # created_at of the latest draft indexed by accession
        self._housekeeping_at = 0.0

    def step(self) -> int:
        done = self._read_received()
        self._index_drafts()
        done += self._pair_waiting()
        if self.clock() >= self._housekeeping_at:
            self._housekeeping_at = self.clock() + HOUSEKEEPING_SECONDS
            done += self._expire()
            self._remove_stray_files()
        return done

    # reading the SRs the receiver kept

    def _read_received(self) -> int:
        rows = self.store.db.execute(
            "SELECT id, study_uid, path FROM feedback WHERE state = ? ORDER BY id LIMIT 16",
            (State.RECEIVED,)).fetchall()
        for row in rows:
            path = Path(row["path"])
            try:
                ds = pydicom.dcmread(confined(path, self.config.feedback_dir))
                report = read_sr(ds, self.store.db, self.config)
            except Ignored as exc:
                self._settle(row, State.IGNORED, str(exc))
            except OutsideRoot:
                self._settle(row, State.IGNORED, "its file is not under the feedback folder")
                continue  # never touched
            except FileNotFoundError:
                self._settle(row, State.IGNORED, "its file is gone")
            except Exception as exc:  # noqa: BLE001 - whatever a hostile SR makes pydicom raise
                self._settle(row, State.IGNORED, f"unreadable SR ({type(exc).__name__})")
            else:
                self._settle(row, State.WAITING, None, report)
            path.unlink(missing_ok=True)
        return len(rows)

    def _settle(self, row: sqlite3.Row, state: State, reason: str | None,
                report: SignedReport | None = None) -> None:
        """A read SR becomes a signed report waiting for its draft, or ignored; its file goes."""
        with self.store.transaction() as db:
            db.execute(
                """UPDATE feedback SET state = ?, reason = ?, path = NULL, accession = ?,
                   patient_ids = ?, findings = ?, impression = ? WHERE id = ? AND state = ?""",
                (state, reason, report.accession if report else None,
                 json.dumps(report.patient_ids) if report else None,
                 report.findings if report else None, report.impression if report else None,
                 row["id"], State.RECEIVED))
        outcome = "stored" if state == State.WAITING else "ignored"
        key = study_key(row["study_uid"])
        if reason:
            log.warning("feedback.ignored", source="dicom", study=key, feedback=row["id"],
                        reason=reason)
        audit.feedback_received("dicom", outcome, row["study_uid"], row["id"], reason=reason)

    # pairing

    def _index_drafts(self) -> None:
        """Note each new draft's accession number and patient ID (from its SR), so that a signed
        report naming only an order finds it. Drafts are written by one stage in time order."""
        rows = self.store.db.execute(
            """SELECT r.sr_uid, r.study_uid, r.path, r.created_at FROM reports r
               WHERE r.created_at > ? AND NOT EXISTS (
                   SELECT 1 FROM draft_orders d WHERE d.sr_uid = r.sr_uid)
               ORDER BY r.created_at""", (self._indexed_until,)).fetchall()
        for row in rows:
            ds = self._draft_sr(row["path"], header_only=True)
            with self.store.transaction() as db:
                db.execute("INSERT OR IGNORE INTO draft_orders VALUES (?, ?, ?, ?)",
                           (row["sr_uid"], row["study_uid"],
                            _single(ds, "AccessionNumber") if ds else "",
                            _single(ds, "PatientID") if ds else ""))
            self._indexed_until = row["created_at"]

    def _pair_waiting(self) -> int:
        """Try the waiting reports that have not been tried since the latest draft was made."""
        db = self.store.db
        latest = db.execute("SELECT MAX(created_at) FROM reports").fetchone()[0]
        if latest is None:
            return 0
        rows = db.execute(
            "SELECT * FROM feedback WHERE state = ? AND tried_at < ? ORDER BY id LIMIT 64",
            (State.WAITING, latest)).fetchall()
        paired = 0
        for row in rows:
            try:
                draft = self._draft_for(row)
            except Mismatch as exc:
                self._ignore(row, str(exc))
                continue
            if draft is None:
                with self.store.transaction() as tx:
                    tx.execute("UPDATE feedback SET tried_at = ? WHERE id = ?", (latest, row["id"]))
                continue
            paired += self._pair(row, draft)
        return paired

    def _draft_for(self, row: sqlite3.Row) -> DraftText | None:
        found = draft_of(self.store.db, row["study_uid"], row["accession"],
                         json.loads(row["patient_ids"] or "[]"))
        if found is None:
            return None
        ds = self._draft_sr(found["path"])
        if ds is None:
            return None
        model = f"{_single(ds, 'ManufacturerModelName')} {_first(ds, 'SoftwareVersions')}"
        return DraftText(found["sr_uid"], found["study_uid"], joined(*sr_text(ds)),
                         model.strip(), bool(found["demo"]))

    def _draft_sr(self, path: str, header_only: bool = False) -> Dataset | None:
        """One of our draft SRs (None when retention took it meanwhile)."""
        try:
            return pydicom.dcmread(confined(Path(path), self.config.reports_dir),
                                   specific_tags=["AccessionNumber", "PatientID"]
                                   if header_only else None)
        except (OSError, ValueError, EOFError, InvalidDicomError) as exc:
            log.warning("feedback.draft_unreadable", reason=type(exc).__name__)
            return None

    def _pair(self, row: sqlite3.Row, draft: DraftText) -> int:
        signed = joined(row["findings"], row["impression"])
        pair = Pair.scored(signed, draft.text)
        now = self.clock()
        with self.store.transaction() as db:
            done = db.execute(
                """UPDATE feedback SET state = ?, reason = NULL, sr_uid = ?, study_uid = ?,
                   paired_at = ?, model = ?, demo = ?, scores = ?, labels = ?, misses = ?
                   WHERE id = ? AND state = ?""",
                (State.PAIRED, draft.sr_uid, draft.study_uid, now, draft.model, int(draft.demo),
                 json.dumps(pair.scores), json.dumps(pair.labels), json.dumps(pair.misses),
                 row["id"], State.WAITING)).rowcount
            if not done:
                return 0
            db.execute(
                """UPDATE feedback SET state = ?, reason = ? WHERE sr_uid = ? AND state = ?
                   AND id != ?""",
                (State.SUPERSEDED, "a later signed report of the same draft replaced it",
                 draft.sr_uid, State.PAIRED, row["id"]))
        log.info("feedback.paired", source=row["source"], feedback=row["id"],
                 study=study_key(draft.study_uid), demo=draft.demo,
                 **{k.replace("-", "_").replace(" ", "_").lower(): round(v, 4)
                    for k, v in pair.scores.items() if v is not None},
                 significant_misses=pair.misses)
        audit.feedback_paired(row["source"], row["id"], draft.study_uid, draft.sr_uid,
                              pair.scores, pair.misses)
        return 1

    def _ignore(self, row: sqlite3.Row, reason: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE feedback SET state = ?, reason = ?, findings = NULL, "
                       "impression = NULL WHERE id = ? AND state = ?",
                       (State.IGNORED, reason, row["id"], State.WAITING))
        log.warning("feedback.ignored", source=row["source"], feedback=row["id"], reason=reason)
        audit.feedback_received(row["source"], "ignored", row["study_uid"], row["id"],
                                reason=reason)

    # housekeeping

    def _expire(self) -> int:
        """Reports that waited ``feedback.wait_days`` for a draft are unpaired; their text goes."""
        cutoff = self.clock() - self.settings.wait_days * DAY
        reason = f"no draft within feedback.wait_days ({self.settings.wait_days:g})"
        with self.store.transaction() as db:
            rows = db.execute("SELECT id, source, study_uid FROM feedback WHERE state = ? "
                              "AND received_at < ?", (State.WAITING, cutoff)).fetchall()
            db.execute("UPDATE feedback SET state = ?, reason = ?, findings = NULL, "
                       "impression = NULL WHERE state = ? AND received_at < ?",
                       (State.UNPAIRED, reason, State.WAITING, cutoff))
        for row in rows:
            audit.feedback_unpaired(row["source"], row["id"], row["study_uid"], reason)
        if rows:
            log.info("feedback.unpaired", reports=len(rows), reason=reason)
        return len(rows)

    def _remove_stray_files(self) -> None:
        root = self.config.feedback_dir
        if not root.is_dir():
            return
        named = {Path(p).resolve() for (p,) in self.store.db.execute(
            "SELECT path FROM feedback WHERE path IS NOT NULL")}
        cutoff = time.time() - STRAY_FILE_SECONDS
        for path in root.glob("*/*.dcm"):
            try:
                path = confined(path, root)
                if path not in named and path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass  # gone meanwhile, or not ours to remove


def _first(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, (MultiValue, list, tuple)):
        return str(value[0]) if value else ""
    return str(value or "")


@dataclass(frozen=True)
class Pair:
    """A signed report and its draft measured with the scorer and labeler of `cxr-node eval`."""

    scores: dict[str, float | None]
    labels: dict[str, dict[str, int | None]]
    misses: list[str]

    @classmethod
    def scored(cls, signed: str, draft: str) -> Pair:
        reference, drafted = label(signed), label(draft)
        f1 = {s.name: s.value for s in label_scores([reference], [drafted])}
        return cls({**report_scores(signed, draft), "label F1": f1["label F1 micro (14)"]},
                   {"signed": reference, "draft": drafted},
                   significant_misses(reference, drafted))


# --- agreement over time ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rolling:
    """Agreement over the last ``feedback.window_pairs`` pairs of ``feedback.window_days``."""

    pairs: int
    rouge_l: float | None
    bleu_2: float | None
    label_f1: dict[str, float | None]
    miss_share: float | None
    misses: dict[str, int]
    states: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "ROUGE-L": self.rouge_l, "BLEU-2": self.bleu_2,
                **self.label_f1, "significant miss share": self.miss_share,
                "significant misses": self.misses, "reports": self.states}


def rolling(db: sqlite3.Connection, settings: FeedbackConfig, now: float | None = None) -> Rolling:
    """The window's means of the pairs' scores, label F1 over its pairs (both texts' labels, as
    `cxr-node eval` counts them), its significant misses, and the signed reports by state."""
    now = time.time() if now is None else now
    rows = db.execute(
        """SELECT scores, labels, misses FROM feedback WHERE state = ? AND received_at >= ?
           ORDER BY received_at DESC LIMIT ?""",
        (State.PAIRED, now - settings.window_days * DAY, settings.window_pairs)).fetchall()
    scores = [json.loads(r["scores"]) for r in rows]
    labels = [json.loads(r["labels"]) for r in rows]
    misses = [json.loads(r["misses"]) for r in rows]
    f1 = {s.name: s.value for s in label_scores([x["signed"] for x in labels],
                                                [x["draft"] for x in labels])} if rows else {}
    states = dict(db.execute("SELECT state, COUNT(*) FROM feedback GROUP BY state").fetchall())
    return Rolling(
        pairs=len(rows), rouge_l=_mean(s["ROUGE-L"] for s in scores),
        bleu_2=_mean(s["BLEU-2"] for s in scores),
        label_f1={name: f1.get(name) for name in LABEL_F1},
        miss_share=sum(bool(m) for m in misses) / len(rows) if rows else None,
        misses=dict(Counter(name for names in misses for name in names)), states={s.value: states.get(s.value, 0) for s in State})


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def recent(db: sqlite3.Connection, limit: int = RECENT) -> list[dict[str, Any]]:
    """The latest signed reports, by study key, with their scores and misses: no identifiers
    and no text."""
    rows = db.execute(
        """SELECT id, source, state, reason, study_uid, received_at, model, demo, scores, misses
           FROM feedback ORDER BY id DESC LIMIT ?""", (limit,)).fetchall()
    shown = []
    for r in rows:
        scores = json.loads(r["scores"]) if r["scores"] else {}
        shown.append({
            "id": r["id"], "study": study_key(r["study_uid"]) if r["study_uid"] else None,
            "source": r["source"], "state": r["state"], "reason": r["reason"],
            "received_at": r["received_at"], "model": r["model"],
            "demo": bool(r["demo"]) if r["demo"] is not None else None,
            "ROUGE-L": scores.get("ROUGE-L"), "BLEU-2": scores.get("BLEU-2"),
            "label F1": scores.get("label F1"),
            "significant misses": json.loads(r["misses"]) if r["misses"] else []})
    return shown


def snapshot(store: Store, settings: FeedbackConfig, limit: int = RECENT) -> dict[str, Any]:
    """What the status page and `cxr-node feedback status --json` show."""
    return {"window": {"max_pairs": settings.window_pairs, "days": settings.window_days},
            "rolling": rolling(store.db, settings).as_dict(),
            "recent": recent(store.db, limit)}
