"""The manual MeSH indexing of the Indiana University chest X-ray reports, as CheXpert labels.

Each IU report (Open-i, NLMCXR_reports.tgz) carries `<MeSH><major>` terms written by people who
read it: a heading, then qualifiers, such as "Pleural Effusion/bilateral/small" or
"Opacity/lung/base/left"; "normal" for a normal report; "No Indexing" for one nobody indexed.
They name what the report says is present, never what it says is absent, so they give each
observation a positive/not positive reference, against which the labeler is validated.

MAPPING says which headings (and for some, which qualifiers) mean which CheXpert observation.
Three rules translate the indexers' conventions into CheXpert's:
* a "round" opacity or density is how they name a nodule, so it also means Lung Lesion, as
  "nodular opacity" does for CheXpert;
* a term qualified "borderline" is uncertain (-1), as "borderline cardiomegaly" is for CheXpert;
* "normal" is No Finding, and so is a report indexed with devices only: CheXpert's No Finding
  allows support devices, the indexers' "normal" does not.

COVERED lists the observations MeSH has headings for; Enlarged Cardiomediastinum and
Pleural Other have none (only qualifiers of "Mediastinum" and "Thickening"), and their mapping is
approximate: they are reported but not COVERED.
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr_node.evaluation.labels import OBSERVATIONS, Labels

_Rule = tuple[str, frozenset[str] | None]
_ROUND = frozenset({"round"})
_DEVICE: tuple[_Rule, ...] = (("Support Devices", None),)
# heading -> the observations it means: each with the qualifiers of which one must be present,
# or None
MAPPING: dict[str, tuple[_Rule, ...]] = {
    "normal": (("No Finding", None),),
    "Mediastinum": (("Enlarged Cardiomediastinum", frozenset({"enlarged", "prominent",
                                                               "widened"})),),
    "Cardiomegaly": (("Cardiomegaly", None),),
    "Cardiac Shadow": (("Cardiomegaly", frozenset({"enlarged"})),),
    "Nodule": (("Lung Lesion", None),),
    "Mass": (("Lung Lesion", None),),
    "Opacity": (("Lung Opacity", None), ("Lung Lesion", _ROUND)),
    "Density": (("Lung Lesion", _ROUND),),
    "Airspace Disease": (("Lung Opacity", None),),
    "Infiltrate": (("Lung Opacity", None),),
    "Pulmonary Edema": (("Edema", None),),
    "Edema": (("Edema", None),),
    "Consolidation": (("Consolidation", None),),
    "Pneumonia": (("Pneumonia", None),),
    "Pulmonary Atelectasis": (("Atelectasis", None),),
    "Pneumothorax": (("Pneumothorax", None),),
    "Hydropneumothorax": (("Pneumothorax", None),),
    "Hemopneumothorax": (("Pneumothorax", None),),
    "Pleural Effusion": (("Pleural Effusion", None),),
    "Thickening": (("Pleural Other", frozenset({"pleura"})),),
    "Fractures, Bone": (("Fracture", None),),
    **{device: _DEVICE for device in (
        "Catheters, Indwelling", "Implanted Medical Device", "Medical Device", "Tube, Inserted",
        "Stents", "Surgical Instruments", "Sutures", "Breast Implants")},
}
NOT_INDEXED = "No Indexing"
APPROXIMATE = ("Enlarged Cardiomediastinum", "Pleural Other")
COVERED: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o not in APPROXIMATE)

# The archive holds about 4,000 reports of a few kB; anything far larger is not that archive.
MAX_MEMBERS = 20_000
MAX_MEMBER_BYTES = 1_000_000


def mesh_labels(terms: Sequence[str]) -> Labels:
    """1 for each observation a MeSH major term maps to, 0 for the others; -1 where each such
    term is qualified "borderline" (CheXpert's uncertain, as in "borderline cardiomegaly")."""
    labels: Labels = dict.fromkeys(OBSERVATIONS, 0)
    for term in terms:
        heading, *qualifiers = (part.strip() for part in term.split("/"))
        for observation, required in MAPPING.get(heading, ()):
            if required is None or required & set(qualifiers):
                value = -1 if "borderline" in qualifiers else 1
                if value == 1 or labels[observation] == 0:
                    labels[observation] = value
    if terms and all(MAPPING.get(_heading(t)) == _DEVICE for t in terms):
        labels["No Finding"] = 1  # CheXpert's No Finding allows support devices; "normal" not
    return labels


def _heading(term: str) -> str:
    return term.split("/", 1)[0].strip()


@dataclass(frozen=True)
class IUReport:
    """One report of the archive: its number, its sections and its MeSH major terms."""

    number: str
    findings: str
    impression: str
    major: tuple[str, ...]
    images: tuple[str, ...] = ()
    """The parentImage ids: the image files' names in the Open-i image archives."""

    @property
    def text(self) -> str:
        return " ".join(part for part in (self.findings, self.impression) if part)

    @property
    def indexed(self) -> bool:
        return NOT_INDEXED not in self.major


def iu_reports(archive: Path) -> Iterator[IUReport]:
    """The reports of NLMCXR_reports.tgz (`ecgen-radiology/<n>.xml`), in the archive's order."""
    with tarfile.open(archive, "r:gz") as tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise ValueError(f"{archive}: more than {MAX_MEMBERS} members")
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            if member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{archive}: {member.name} is {member.size} bytes")
            stream = tar.extractfile(member)
            assert stream is not None
            root = ET.fromstring(stream.read())
            sections = {e.get("Label"): (e.text or "").strip()
                        for e in root.iter("AbstractText")}
            yield IUReport(
                number=Path(member.name).stem,
                findings=sections.get("FINDINGS", ""),
                impression=sections.get("IMPRESSION", ""),
                major=tuple((e.text or "").strip() for e in root.iterfind("MeSH/major")),
                images=tuple(e.get("id", "") for e in root.iterfind("parentImage")),
            )
