"""A readable text rendering of any DICOM Structured Report, ours or anyone else's.

What IT needs to check a document without a DICOM viewer: the header lines that decide how a PACS
treats it (SOP class, document flags, study and series, manufacturer and model, author device,
evidence, predecessor), then the content tree walked generically, whatever its template.

Patient name, ID, birth date and sex, the accession number and the referring physician are shown
only with ``phi=True``; so are the values of subject-context items in the tree (TID 1007 subject
name, ID, birth date). Free text is shown as it is: that is what the document says.

A malformed document never makes the rendering fail: what cannot be read is marked where it
occurs and listed under "Problems" at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

HIDDEN = "(hidden; --phi to show)"
MAX_DEPTH = 32
# Subject-context items (TID 1007) that identify the patient: (code value, coding scheme).
SUBJECT_IDENTIFIERS = {("121029", "DCM"), ("121030", "DCM"), ("121031", "DCM")}
# Value types whose items must have a concept name (PS3.3 Document Content Macro); the others may
# omit it (non-root CONTAINER without heading, references and coordinates).
NAMED_VALUE_TYPES = {"TEXT", "NUM", "CODE", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME"}
DEVICE_OBSERVER_UID = ("121012", "DCM")
DEVICE_OBSERVER_NAME = ("121013", "DCM")
DEVICE_OBSERVER_MODEL = ("121015", "DCM")


def render_sr(ds: Dataset, phi: bool = False) -> str:
    """The SR as text: header lines, then one line per content item, then any problems found."""
    renderer = _Renderer(phi)
    renderer.header(ds)
    renderer.lines.append("")
    renderer.content(ds)
    if renderer.problems:
        renderer.lines += ["", "Problems:", *(f"  - {p}" for p in renderer.problems)]
    return "\n".join(map(printable, renderer.lines)) + "\n"


# C0 and C1 controls (escape sequences can rewrite a terminal: hide lines, retitle the window, fake
# prompts) and the bidirectional overrides that make text read differently from its bytes.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: every control character shown as an escape."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                            else f"\\u{ord(m.group()):04x}", text)


class _Renderer:
    def __init__(self, phi: bool) -> None:
        self.phi = phi
        self.lines: list[str] = []
        self.problems: list[str] = []

    # --- header ---------------------------------------------------------------------------------

    def header(self, ds: Dataset) -> None:
        get = self._getter(ds, "header")
        sop_class = get("SOPClassUID")
        kind = UID(sop_class).name if sop_class else ""
        self._line("SOP class", f"{kind} ({sop_class})" if kind != sop_class else sop_class)
        self._line("SOP instance", f"{get('SOPInstanceUID')}  #{get('InstanceNumber')}")
        if get("Modality") != "SR":
            self.problems.append(f"Modality is {get('Modality') or 'missing'}, not SR")
        flags = (
            f"completion {get('CompletionFlag') or '-'}, "
            f"verification {get('VerificationFlag') or '-'}, "
            f"preliminary {get('PreliminaryFlag') or '-'}"
        )
        self._line("Document flags", flags)
        if get("CompletionFlagDescription"):
            self._line("Completion note", get("CompletionFlagDescription"))
        self._line("Study UID", get("StudyInstanceUID"))
        self._line("Series UID", get("SeriesInstanceUID"))
        self._line("Series", f"#{get('SeriesNumber')} {get('SeriesDescription')}".rstrip())
        self._line("Content date", f"{get('ContentDate')} {get('ContentTime')}".strip())
        self._line("Character set", get("SpecificCharacterSet") or "(default, ASCII)")
        equipment = get("Manufacturer")
        if get("ManufacturerModelName"):
            equipment += f", model {get('ManufacturerModelName')}"
        if get("SoftwareVersions"):
            equipment += f", software {get('SoftwareVersions')}"
        if get("InstitutionName"):
            equipment += f", {get('InstitutionName')}"
        self._line("Manufacturer", equipment)
        for i, author in enumerate(self._items(ds, "AuthorObserverSequence"), 1):
            self._line(f"Author {i}", self._author(author))
        self._line("Device observer", self._device_observer(ds))
        self._line("Evidence", self._evidence(ds))
        predecessors = self._referenced_instances(ds, "PredecessorDocumentsSequence")
        self._line("Predecessor", ", ".join(predecessors) if predecessors else "none")
        if self.phi:
            patient = (
                f"{get('PatientName')}, ID {get('PatientID')}, born {get('PatientBirthDate')}, "
                f"sex {get('PatientSex')}"
            )
            self._line("Patient", patient)
            self._line("Accession", get("AccessionNumber"))
            self._line("Referring", get("ReferringPhysicianName"))
        else:
            for label in ("Patient", "Accession", "Referring"):
                self._line(label, HIDDEN)

    def _author(self, item: Dataset) -> str:
        get = self._getter(item, "AuthorObserverSequence")
        if get("ObserverType") == "DEV":
            return (
                f"device {get('ManufacturerModelName')} by {get('Manufacturer')}, "
                f"UID {get('DeviceUID')}"
            )
        name = get("PersonName") if self.phi else HIDDEN
        return f"{get('ObserverType') or 'unknown type'} {name}"

    def _device_observer(self, ds: Dataset) -> str:
        """Device observer named at document level (TID 1001 at the root), if any."""
        found: dict[tuple[str, str], str] = {}
        for item in self._items(ds, "ContentSequence"):
            if item.get("RelationshipType") == "HAS OBS CONTEXT":
                code = self._code(item, "ConceptNameCodeSequence")
                if code in (DEVICE_OBSERVER_UID, DEVICE_OBSERVER_NAME, DEVICE_OBSERVER_MODEL):
                    found[code] = str(item.get("UID") or item.get("TextValue") or "")
        if not found:
            return "none at document level"
        name = found.get(DEVICE_OBSERVER_NAME, "(no name)")
        model = found.get(DEVICE_OBSERVER_MODEL)
        uid = found.get(DEVICE_OBSERVER_UID, "(no UID)")
        return f"{name}" + (f", model {model}" if model else "") + f", UID {uid}"

    def _evidence(self, ds: Dataset) -> str:
        current = self._referenced_instances(ds, "CurrentRequestedProcedureEvidenceSequence")
        other = self._referenced_instances(ds, "PertinentOtherEvidenceSequence")
        if not current and not other:
            self.problems.append("no evidence: the document references no source instance")
        return f"{len(current)} instance(s) of this procedure, {len(other)} other"

    def _referenced_instances(self, ds: Dataset, keyword: str) -> list[str]:
        """SOP Instance UIDs in a Hierarchical SOP Instance Reference sequence."""
        uids = []
        for study in self._items(ds, keyword):
            for series in self._items(study, "ReferencedSeriesSequence"):
                for instance in self._items(series, "ReferencedSOPSequence"):
                    uids.append(str(instance.get("ReferencedSOPInstanceUID", "(no UID)")))
        return uids

    # --- content tree ---------------------------------------------------------------------------

    def content(self, ds: Dataset) -> None:
        if "ContentSequence" not in ds or "ValueType" not in ds:
            self.problems.append("not an SR document: no ValueType or ContentSequence at the root")
            return
        self._item(ds, "1", 0, root=True)

    def _item(self, item: Dataset, path: str, depth: int, root: bool = False) -> None:
        indent = "  " * depth
        try:
            head, text = self._describe(item, path, root)
        except Exception as exc:  # noqa: BLE001 - a broken item is reported, not fatal
            self.lines.append(f"{indent}[item {path}: cannot be read]")
            self.problems.append(f"item {path}: {type(exc).__name__}: {exc}")
            return
        self.lines.append(indent + head)
        for line in text:
            self.lines.append(f"{indent}    {line}")
        children = self._items(item, "ContentSequence", where=f"item {path}")
        if children and depth >= MAX_DEPTH:
            self.problems.append(f"item {path}: nested deeper than {MAX_DEPTH} levels; not shown")
            return
        for i, child in enumerate(children, 1):
            self._item(child, f"{path}.{i}", depth + 1)

    def _describe(self, item: Dataset, path: str, root: bool) -> tuple[str, list[str]]:
        """One head line and any continuation lines (multi-line text) for one content item."""
        relationship = "" if root else item.get("RelationshipType")
        if not root and not relationship:
            self.problems.append(f"item {path}: no RelationshipType")
        if "ReferencedContentItemIdentifier" in item:
            target = ".".join(str(n) for n in item.ReferencedContentItemIdentifier)
            return f"{_lower(relationship)} -> item {target} (by reference)", []
        value_type = item.get("ValueType")
        if not value_type:
            self.problems.append(f"item {path}: no ValueType")
            return f"{_lower(relationship)} [no ValueType]".strip(), []
        name = self._concept_name(item, path, value_type, root)
        prefix = f"{_lower(relationship)} {value_type}".strip()
        if value_type == "CONTAINER":
            templates = [
                f"TID {t.get('TemplateIdentifier', '?')}"
                for t in self._items(item, "ContentTemplateSequence")
            ]
            return f"{prefix} {name}" + (f"  [{', '.join(templates)}]" if templates else ""), []
        render = _VALUES.get(value_type)
        if render is None:
            return f"{prefix} {name} = (value type {value_type} not rendered)", []
        value = render(self, item, path)
        code = self._code(item, "ConceptNameCodeSequence")
        if code in SUBJECT_IDENTIFIERS and not self.phi:
            value = HIDDEN
        lines = value.splitlines() or [""]
        if len(lines) == 1 and len(lines[0]) <= 80:
            return f"{prefix} {name} = {lines[0]}", []
        return f"{prefix} {name}:", lines

    def _concept_name(self, item: Dataset, path: str, value_type: str, root: bool) -> str:
        codes = self._items(item, "ConceptNameCodeSequence", where=f"item {path}")
        if not codes:
            if root or value_type in NAMED_VALUE_TYPES:
                self.problems.append(f"item {path}: {value_type} without a concept name")
            return "(unnamed)"
        return f'"{codes[0].get("CodeMeaning", "?")}"'

    # --- values by type -------------------------------------------------------------------------

    def _required(self, item: Dataset, keyword: str, path: str) -> str:
        if keyword not in item or item[keyword].value in (None, ""):
            self.problems.append(f"item {path}: {item.get('ValueType')} without {keyword}")
            return f"[missing {keyword}]"
        return str(item[keyword].value)

    def _text(self, item: Dataset, path: str) -> str:
        return self._required(item, "TextValue", path)

    def _coded(self, item: Dataset, path: str) -> str:
        codes = self._items(item, "ConceptCodeSequence", where=f"item {path}")
        if not codes:
            self.problems.append(f"item {path}: CODE without ConceptCodeSequence")
            return "[missing ConceptCodeSequence]"
        return _code_text(codes[0])

    def _numeric(self, item: Dataset, path: str) -> str:
        measured = self._items(item, "MeasuredValueSequence", where=f"item {path}")
        if not measured:
            qualifier = self._items(item, "NumericValueQualifierCodeSequence")
            return f"(no value: {_code_text(qualifier[0])})" if qualifier else "(no value)"
        value = measured[0].get("NumericValue", "[missing NumericValue]")
        units = self._items(measured[0], "MeasurementUnitsCodeSequence")
        unit = units[0].get("CodeValue", "") if units else ""
        return f"{value} {unit}".rstrip()

    def _uid(self, item: Dataset, path: str) -> str:
        return self._required(item, "UID", path)

    def _person(self, item: Dataset, path: str) -> str:
        return self._required(item, "PersonName", path)

    def _date(self, item: Dataset, path: str) -> str:
        return self._required(item, "Date", path)

    def _time(self, item: Dataset, path: str) -> str:
        return self._required(item, "Time", path)

    def _datetime(self, item: Dataset, path: str) -> str:
        return self._required(item, "DateTime", path)

    def _reference(self, item: Dataset, path: str) -> str:
        refs = self._items(item, "ReferencedSOPSequence", where=f"item {path}")
        if not refs:
            self.problems.append(f"item {path}: {item.ValueType} without ReferencedSOPSequence")
            return "[missing ReferencedSOPSequence]"
        ref = refs[0]
        sop_class = str(ref.get("ReferencedSOPClassUID", ""))
        kind = UID(sop_class).name if sop_class else "?"
        frames = ref.get("ReferencedFrameNumber")
        frame_text = f", frames {frames}" if frames else ""
        return f"{kind} {ref.get('ReferencedSOPInstanceUID', '[no UID]')}{frame_text}"

    def _spatial(self, item: Dataset, path: str) -> str:
        data = item.get("GraphicData") or []
        return f"{item.get('GraphicType', '[missing GraphicType]')}, {len(data)} coordinates"

    def _temporal(self, item: Dataset, path: str) -> str:
        return str(item.get("TemporalRangeType", "[missing TemporalRangeType]"))

    # --- safe access ----------------------------------------------------------------------------

    def _items(self, ds: Dataset, keyword: str, where: str = "header") -> list[Dataset]:
        """Items of a sequence, or [] with a problem noted when it cannot be read."""
        try:
            value = ds.get(keyword)
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"{where}: {keyword} cannot be read ({exc})")
            return []
        if value is None:
            return []
        if not all(isinstance(i, Dataset) for i in value):
            self.problems.append(f"{where}: {keyword} is not a sequence of items")
            return []
        return list(value)

    def _code(self, item: Dataset, keyword: str) -> tuple[str, str] | None:
        codes = self._items(item, keyword)
        if not codes:
            return None
        return (str(codes[0].get("CodeValue", "")), str(codes[0].get("CodingSchemeDesignator", "")))

    def _getter(self, ds: Dataset, where: str) -> Callable[[str], str]:
        def get(keyword: str) -> str:
            try:
                value = ds.get(keyword)
            except Exception as exc:  # noqa: BLE001
                self.problems.append(f"{where}: {keyword} cannot be read ({exc})")
                return "[unreadable]"
            if value is None:
                return ""
            if isinstance(value, (list, tuple, MultiValue)):
                return " \\ ".join(str(v) for v in value)
            return str(value)

        return get

    def _line(self, label: str, value: str) -> None:
        self.lines.append(f"{label + ':':<17}{value}")


def _lower(relationship: Any) -> str:
    return str(relationship or "").lower()


def _code_text(code: Dataset) -> str:
    return (
        f"{code.get('CodeMeaning', '?')} "
        f"({code.get('CodeValue', code.get('LongCodeValue', code.get('URNCodeValue', '?')))}, "
        f"{code.get('CodingSchemeDesignator', '?')})"
    )


_VALUES: dict[str, Callable[[_Renderer, Dataset, str], str]] = {
    "TEXT": _Renderer._text,
    "CODE": _Renderer._coded,
    "NUM": _Renderer._numeric,
    "UIDREF": _Renderer._uid,
    "PNAME": _Renderer._person,
    "DATE": _Renderer._date,
    "TIME": _Renderer._time,
    "DATETIME": _Renderer._datetime,
    "IMAGE": _Renderer._reference,
    "COMPOSITE": _Renderer._reference,
    "WAVEFORM": _Renderer._reference,
    "SCOORD": _Renderer._spatial,
    "SCOORD3D": _Renderer._spatial,
    "TCOORD": _Renderer._temporal,
}
