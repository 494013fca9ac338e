"""`--from-node`: the studies this node drafted and has the signed reports of, as training data.

Each paired signed report (cxr_node/feedback.py) becomes one manifest line: the study's images as
the node keeps them (the node's own selection picks the frontal and lateral at training time, as
for a live draft) and the signed findings and impression with identifiers taken out (`scrub`:
the names the study's DICOM headers give, and the forms reports use). Nothing identifying goes in
the manifest: the study's id is the pair's row number, its patient an HMAC of the Patient ID under
a key made for this export and then forgotten (studies of one patient stay together for the
held-out split, and the key cannot be recovered to test a guess), and its day the day the signed
report arrived. Pairs whose images retention has already deleted are counted, not used.

The manifest names the node's image files where they are (absolute paths): they stay under the
node's retention, and no copy of a DICOM header leaves the state folder.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from cxr_node.adaptation.scrub import Scrubber
from cxr_node.config import Config
from cxr_node.durable import private_dir
from cxr_node.evaluation.datasets import MAX_IMAGES_PER_STUDY, write_manifest

PAIRS = "node-pairs.jsonl"
SOURCE, LICENCE = "node", "this site's signed reports"
NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName", "OperatorsName",
                 "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
                 "PhysiciansOfRecord", "RequestingPhysician")


class PairsError(Exception):
    """The node's state cannot be read."""


@dataclass
class NodePairs:
    manifest: Path
    studies: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"source": SOURCE, "studies": self.studies, "left_out": dict(self.left_out),
                "identifiers_removed": dict(self.removed)}


def export_pairs(config: Config, out: Path) -> NodePairs:
    """Write the node's paired studies as a manifest in `out` (a private folder)."""
    path = config.database_path
    if not path.is_file():
        raise PairsError(f"{path}: no node state here (is node.state_dir right?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise PairsError(f"{path}: cannot open ({exc})") from None
    db.row_factory = sqlite3.Row
    key = secrets.token_bytes(32)
    result = NodePairs(private_dir(Path(out)) / PAIRS)
    lines = []
    with db:
        rows = db.execute(
            "SELECT f.id, f.findings, f.impression, f.received_at, r.study_uid FROM feedback f "
            "JOIN reports r ON r.sr_uid = f.sr_uid WHERE f.state = 'paired' ORDER BY f.id"
        ).fetchall()
        for row in rows:
            images = [(Path(i["path"]), i["view"]) for i in db.execute(
                "SELECT path, view FROM instances WHERE study_uid = ? ORDER BY id",
                (row["study_uid"],))][-MAX_IMAGES_PER_STUDY:]
            present = [(p, v) for p, v in images if p.is_file()]
            if not present:
                result.left_out["images deleted by retention (retention.images_days)"] += 1
                continue
            if not (row["findings"] or row["impression"]):
                result.left_out["signed report without text"] += 1
                continue
            header = _header(present[-1][0])
            scrubber = Scrubber(_names(header))
            findings, impression = (scrubber.scrub(row[k] or "") for k in ("findings",
                                                                              "impression"))
            result.removed.update(findings.removed + impression.removed)
            patient = str(header.get("PatientID", "")) if header is not None else ""
            lines.append({
                "id": f"node-{row['id']}",
                "patient_id": _pseudonym(key, patient or row["study_uid"]),
                "images": [{"path": str(p), "view": v} for p, v in present],
                "findings": findings.text, "impression": impression.text,
                "day": datetime.fromtimestamp(row["received_at"], UTC).date().isoformat(),
                "source": SOURCE, "licence": LICENCE})
    db.close()
    result.studies = len(lines)
    write_manifest(result.manifest, lines)
    return result


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def _names(header: pydicom.Dataset | None) -> list[str]:
    if header is None:
        return []
    names = []
    for keyword in NAME_KEYWORDS:
        value = header.get(keyword)
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        names += [str(v) for v in values if v]
    return names


def _pseudonym(key: bytes, patient: str) -> str:
    return "patient-" + hmac.new(key, patient.encode(), hashlib.sha256).hexdigest()[:16]
