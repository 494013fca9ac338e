"""A training corpus from public case collections, each record kept with its licence.

Public collections of chest X-ray cases with free-text notes (the COVID-19 image data collection
and the sources it gathers: Radiopaedia, SIRM, journals, Wikipedia) carry a licence per image,
and many carry none. A record goes into the corpus only when its licence allows a site to train
an adapter on it and use that adapter:

* CC0, public domain, CC BY, CC BY-SA, Apache 2.0: kept (share-alike is noted in the card);
* NC (non-commercial only): left out, unless the builder is told the use is non-commercial
  (``allow_non_commercial``; a hospital's clinical use usually is not);
* ND (no derivatives): left out: an adapter trained on the record adapts it;
* no licence, or one not listed here: left out: nothing grants the use.

Every record left out is listed with its reason. The corpus is a manifest in the evaluation
format (`cxr_node.evaluation.datasets`), one study per patient and day, with the frontal and
lateral images together as the worker takes them, and with ``source`` and ``licence`` on every
line, beside an ATTRIBUTION.md naming each kept record's origin as its licence requires.

The collection's table is data from elsewhere: file names only ever look up a file found in the
collection's image folder (never a path), and every cell is bounded.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cxr_node.adaptation.scrub import Scrubber
from cxr_node.durable import private_dir, write_atomic
from cxr_node.evaluation.datasets import MAX_SECTION_CHARS, write_manifest

MAX_TABLE_BYTES = 64 * 2**20
MAX_IMAGE_BYTES = 32 * 2**20
MAX_CELL_CHARS = MAX_SECTION_CHARS
CORPUS, REPORT, ATTRIBUTION = "corpus.jsonl", "corpus-report.json", "ATTRIBUTION.md"
SOURCE = "covid-chestxray"
REQUIRED_COLUMNS = ("patientid", "filename", "license", "clinical_notes", "view", "modality")
VIEWS = {"PA": "PA", "AP": "AP", "AP SUPINE": "AP", "AP ERECT": "AP", "L": "LATERAL",
         "LATERAL": "LATERAL"}
_PICTURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_ALLOWED = {"CC0": "CC0", "PUBLIC DOMAIN": "public domain", "CC BY": "CC BY",
            "CC BY-SA": "CC BY-SA", "APACHE 2.0": "Apache 2.0", "APACHE-2.0": "Apache 2.0"}


class CorpusError(ValueError):
    """The collection cannot be read at all (no table, no image folder, not CSV)."""


@dataclass(frozen=True)
class LicenceDecision:
    usable: bool
    licence: str
    reason: str = ""


def licence_decision(text: str, allow_non_commercial: bool = False) -> LicenceDecision:
    """Whether a record under the licence `text` (as the collection writes it) may be trained on."""
    shown = " ".join(text.split())[:80]
    words = re.sub(r"[^A-Z0-9.\- ]", " ", shown.upper())
    bare = " ".join(words.split())
    if bare.startswith("CC"):
        bare = re.sub(r"\s+\d(\.\d)*$", "", bare)  # any version: "CC BY-NC-SA 4.0"
    parts = set(re.split(r"[\s\-]+", bare))
    if not bare or bare in ("UNKNOWN", "UNCLEAR", "NONE", "NA", "N A"):
        return LicenceDecision(False, shown, "no licence stated: nothing grants its use")
    if "ND" in parts:
        return LicenceDecision(False, shown, f"{shown}: no derivatives (ND); an adapter trained "
                                             "on it adapts it")
    if "NC" in parts:
        if allow_non_commercial:
            return LicenceDecision(True, shown)
        return LicenceDecision(False, shown, f"{shown}: non-commercial use only (NC); included "
                                             "only with --allow-non-commercial")
    known = _ALLOWED.get(bare)
    if known is None:
        return LicenceDecision(False, shown, f"{shown}: not a licence this builder knows to "
                                             "allow training (CC0, CC BY, CC BY-SA, Apache 2.0, "
                                             "public domain)")
    return LicenceDecision(True, known)


@dataclass
class Corpus:
    """What a build kept and left out; written as corpus-report.json."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[dict[str, str]] = field(default_factory=list)
    removed: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"source": SOURCE, "studies": len(self.kept),
                "images": sum(len(s["images"]) for s in self.kept),
                "licences": dict(Counter(s["licence"] for s in self.kept)),
                "left_out": self.left_out, "identifiers_removed": dict(self.removed)}


def build_covid_corpus(collection: Path, out: Path, allow_non_commercial: bool = False,
                       table: Path | None = None) -> Corpus:
    """The corpus of a COVID-19 image data collection folder (metadata.csv and images/) in `out`."""
    collection = Path(collection)
    table = table or collection / "metadata.csv"
    rows = _read_table(table)
    images = _image_index(collection / "images")
    out = private_dir(Path(out))
    if (out / CORPUS).exists():
        raise CorpusError(f"{out} already holds a corpus; give a new folder")
    corpus = Corpus()
    groups: dict[tuple[str, str, str], list[tuple[int, dict[str, str]]]] = {}
    for number, row in rows:
        record = f"{table.name}:{number} ({_cell(row, 'filename')[:80] or 'no file name'})"
        problem = _problem(row, images, allow_non_commercial)
        if problem:
            corpus.left_out.append({"record": record, "reason": problem})
            continue
        key = (_cell(row, "patientid"), _cell(row, "offset") or _cell(row, "date"),
               _cell(row, "clinical_notes"))
        groups.setdefault(key, []).append((number, row))
    scrubber = Scrubber()
    private_dir(out / "images")
    lines = []
    for n, ((patient, _, notes), members) in enumerate(groups.items(), 1):
        study_id = f"{SOURCE}-{n:05d}"
        decisions = {licence_decision(_cell(r, "license"), allow_non_commercial).licence
                     for _, r in members}
        scrubbed = scrubber.scrub(notes)
        corpus.removed.update(scrubbed.removed)
        study_images = []
        for index, (_, row) in enumerate(members, 1):
            source = images[_cell(row, "filename")]
            name = f"images/{study_id}-{index}{source.suffix.lower()}"
            shutil.copyfile(source, out / name)
            (out / name).chmod(0o600)
            study_images.append({"path": name, "view": VIEWS[_cell(row, "view").upper()]})
        line = {"id": study_id, "patient_id": f"{SOURCE}-{patient}", "images": study_images,
                "findings": scrubbed.text,
                "impression": _diagnosis(_cell(members[0][1], "finding")),
                "day": _day(_cell(members[0][1], "date")), "source": SOURCE,
                "licence": " + ".join(sorted(decisions))}
        lines.append({k: v for k, v in line.items() if v is not None})
        corpus.kept.append({**line, "records": [f"{table.name}:{number}" for number, _ in members],
                            "origin": sorted({_cell(r, "url") or _cell(r, "doi")
                                              for _, r in members} - {""})})
    write_manifest(out / CORPUS, lines)
    write_atomic(out / REPORT, (json.dumps(corpus.as_dict(), indent=2) + "\n").encode())
    write_atomic(out / ATTRIBUTION, _attribution(corpus).encode())
    return corpus


def _read_table(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise CorpusError(f"{path}: larger than {MAX_TABLE_BYTES:,} bytes")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(f"{path}: not a COVID-19 image data collection table: no column "
                          f"{', '.join(missing)}")
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise CorpusError(f"{path}:{reader.line_num}: not CSV ({exc})") from None


def _image_index(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise CorpusError(f"{folder}: no image folder")
    return {p.name: p for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def _cell(row: dict[str, str], key: str) -> str:
    value = row.get(key) or ""
    return " ".join(value.split())[:MAX_CELL_CHARS] if isinstance(value, str) else ""


def _problem(row: dict[str, str], images: dict[str, Path], allow_non_commercial: bool) -> str:
    """Why the record cannot be used, or "" when it can."""
    decision = licence_decision(_cell(row, "license"), allow_non_commercial)
    if not decision.usable:
        return decision.reason
    modality, view = _cell(row, "modality"), _cell(row, "view").upper()
    if modality.upper() != "X-RAY":
        return f"modality {modality[:20] or 'not given'}: not an X-ray"
    if view not in VIEWS:
        return f"view {view[:20] or 'not given'}: not a PA, AP or lateral chest X-ray"
    if not _cell(row, "clinical_notes"):
        return "no notes: nothing to learn from"
    path = images.get(_cell(row, "filename"))
    if path is None:
        return "its image is not in the collection's image folder"
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return f"its image is {size:,} bytes, more than {MAX_IMAGE_BYTES:,}"
    with path.open("rb") as file:
        if not file.read(8).startswith(_PICTURES):
            return "its image is not a PNG or JPEG file"
    return ""


def _diagnosis(finding: str) -> str:
    """The collection's diagnosis ("Pneumonia/Viral/COVID-19") as an impression sentence."""
    parts = [p.strip() for p in finding.split("/") if p.strip()]
    if not parts:
        return ""
    head, *rest = parts
    return f"{head} ({', '.join(p.lower() if p.isalpha() else p for p in rest)})." if rest \
        else f"{head}."


def _day(text: str) -> str | None:
    for form in ("%B %d, %Y", "%b %d, %Y", "%Y-%m-%d", "%d/%m/%Y"):
        try:
            return datetime.strptime(text, form).date().isoformat()
        except ValueError:
            continue
    return None


def _attribution(corpus: Corpus) -> str:
    lines = ["# Attribution", "",
             "Records of the COVID-19 image data collection (Cohen J.P. et al., arXiv:2003.11597 "
             "and 2006.11988) used in this corpus, each under its own licence. An adapter trained "
             "on records under a share-alike licence (BY-SA) carries that licence's terms.", "",
             "| study | licence | records | origin |", "| --- | --- | --- | --- |"]
    for study in corpus.kept:
        lines.append(f"| {study['id']} | {study['licence']} | {', '.join(study['records'])} | "
                     f"{' '.join(study['origin']) or 'not given'} |")
    return "\n".join(lines) + "\n"


def summary_lines(corpus: Corpus) -> Sequence[str]:
    """For the command's output: what was kept, and each record left out with its reason."""
    report = corpus.as_dict()
    licences = ", ".join(f"{k}: {v}" for k, v in sorted(report["licences"].items()))
    out = [f"kept {report['studies']} studies ({report['images']} images; {licences or 'none'})",
           f"left out {len(corpus.left_out)} records:"]
    out += [f"  {item['record']}: {item['reason']}" for item in corpus.left_out]
    return out
