"""The draft as an Encapsulated PDF (modality DOC), for viewers that never show an SR.

Everything on the page is read from the SR dataset, never from the worker's result, so the PDF
says what the SR says: the AI PRELIMINARY DRAFT — NOT VERIFIED label in a box at the top of every
page (and DEMO MODEL in a black band where the SR carries it), the patient and study lines a report
page shows (name, ID, birth date, sex, accession, study date: the radiologist's PACS files it as a
clinical document, so they are on it exactly as in the SR), each section of the SR in its order
(the Comment notices, Findings, Impressions), the images it read (from its evidence) and the
model that wrote it (device observer, SoftwareVersions, weights fingerprint).

The PDF is made with fpdf2: TrueType/OpenType fonts embedded as subsets, text shaped by HarfBuzz
(Arabic joins and runs right to left), each character drawn with the first of
``report.pdf_fonts`` that has it. A character that none has makes a ReportError naming it and the
fonts (and any configured font file that is missing): the PDF never silently drops a character.
Its metadata holds only what the page shows (title, the model as author, cxr-node as creator, the
draft's time); it has no JavaScript, no actions and no links.

The same SR gives the same PDF, byte for byte, and the same UIDs: the instance's SOP Instance UID
and Series Instance UID are derived from the SR's (one series per study for each rendition, its
number the SR's plus one), so a rebuilt draft is the same instance again.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fontTools.ttLib import TTFont, TTLibError
from fpdf import FPDF
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_ROOT_UID, UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from cxr_node import __version__, report
from cxr_node.config import ReportConfig
from cxr_node.identity import DEMO_LABEL

PAGE_FORMAT = "A4"
MARGIN = 18.0  # mm
TOP_LABEL = "AI PRELIMINARY DRAFT — NOT VERIFIED"
CREATOR = f"cxr-node {__version__}"
OWN_WORDS = "Document status: Images read () Drafted by · page of 0123456789"  # and header labels
MAX_SERIES_NUMBER = 2**31 - 1  # IS
# The device observer's items (TID 1004, DCM codes) the page names the model by.
DEVICE_OBSERVER = {"121013": "name", "121014": "manufacturer", "121015": "model",
                   "121016": "serial"}  # fmt: skip
# Patient and study attributes a rendition carries exactly as the SR does (patient module: the
# whole group 0010; clinical trial: group 0012).
STUDY_ATTRIBUTES = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyDescription", "PhysiciansOfRecord",
    "ProcedureCodeSequence", "ReferencedStudySequence",
)  # fmt: skip
EQUIPMENT_ATTRIBUTES = ("Manufacturer", "InstitutionName", "ManufacturerModelName",
                        "SoftwareVersions", "DeviceSerialNumber")  # fmt: skip
# Characters that take no glyph of their own: line breaks and spaces are layout, format
# characters (joiners, direction marks) and variation selectors change neighbouring glyphs.
_NO_GLYPH = re.compile(r"[\s\u180b-\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")


@dataclass(frozen=True)
class Section:
    """One heading of the SR and its texts, in the SR's order."""

    heading: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class DraftPage:
    """What the page shows, read from the SR."""

    title: str
    status: str
    note: str
    demo: bool
    header: tuple[tuple[str, str], ...]
    sections: tuple[Section, ...]
    images: tuple[str, ...]
    model: tuple[tuple[str, str], ...]
    made: datetime
    footer: str

    def strings(self) -> Iterator[tuple[str, str]]:
        """Every text the page draws, with where it comes from (for messages)."""
        yield "the page's own words", " ".join((TOP_LABEL, report.DEMO_DISCLAIMER,
                                                report.SERIES_LABEL, OWN_WORDS))
        yield "the document title", self.title
        yield "the document status", f"{self.status} {self.note}"
        for label, value in (*self.header, *self.model):
            yield label.lower(), f"{label} {value}"
        for section in self.sections:
            for text in (section.heading, *section.texts):
                yield f"the {section.heading} section", text
        yield "the images read", " ".join(("Images read", *self.images))
        yield "the footer", self.footer


# --- the DICOM instance --------------------------------------------------------------------------


def build(sr: Dataset, settings: ReportConfig) -> Dataset:
    """The draft SR as an Encapsulated PDF Storage instance in the SR's study."""
    document = render(sr, settings)
    ds = rendition_dataset(sr, settings, "pdf", EncapsulatedPDFStorage)
    ds.ConceptNameCodeSequence = [_copy_code(sr.ConceptNameCodeSequence[0])]
    ds.DocumentTitle = f"{TOP_LABEL}: {read_title(sr)}"
    ds.VerificationFlag = "UNVERIFIED"
    ds.AcquisitionDateTime = f"{sr.get('ContentDate', '')}{sr.get('ContentTime', '')}"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)  # even length (PS3.5 7.1)
    return ds


def rendition_dataset(sr: Dataset, settings: ReportConfig, rendition: str, sop_class: str
                      ) -> Dataset:
    """What every rendition's instance shares: the SR's patient, study and equipment exactly as
    the SR has them, a series of its own (SR's number plus the rendition's place), UIDs derived
    from the SR's, the SR as the source instance, and the draft's labels. ``sr`` has been
    checked by read_page (a draft, with the UIDs and numbers used here)."""
    offset = 1 + ("pdf", "page").index(rendition)
    prefix = settings.uid_root or PYDICOM_ROOT_UID
    ds = Dataset()
    ds.SpecificCharacterSet = sr.SpecificCharacterSet
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = report.derived_uid(prefix, f"draft-{rendition}", sr.SOPInstanceUID)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in sr:
            ds[keyword] = sr[keyword]
    for element in sr:
        if element.tag.group in (0x0010, 0x0012):
            ds[element.tag] = element
    for keyword in (*STUDY_ATTRIBUTES, *EQUIPMENT_ATTRIBUTES):
        if keyword in sr:
            ds[keyword] = sr[keyword]
    ds.Modality = "DOC" if rendition == "pdf" else "OT"
    ds.SeriesInstanceUID = report.derived_uid(prefix, f"draft-{rendition}-series",
                                               sr.SeriesInstanceUID)
    ds.SeriesNumber = (int(sr.SeriesNumber) + offset - 1) % MAX_SERIES_NUMBER + 1
    ds.SeriesDescription = report.series_description(
        f"{settings.series_description} ({rendition.upper()})", is_demo(sr))
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = settings.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = "cxr-node"
    ds.SecondaryCaptureDeviceSoftwareVersions = CREATOR
    ds.InstanceNumber = sr.InstanceNumber
    ds.ContentDate = sr.get("ContentDate", "")
    ds.ContentTime = sr.get("ContentTime", "")
    ds.BurnedInAnnotation = "YES"
    source = Dataset()
    source.ReferencedSOPClassUID = sr.SOPClassUID
    source.ReferencedSOPInstanceUID = sr.SOPInstanceUID
    ds.SourceInstanceSequence = [source]
    return ds


def _check_draft(sr: Dataset) -> None:
    """Renditions label machine drafts; an SR that claims more is not one of ours to label."""
    flags = (sr.get("VerificationFlag"), sr.get("PreliminaryFlag"))
    if flags != ("UNVERIFIED", "PRELIMINARY"):
        raise report.ReportError(
            "the SR is not an unverified preliminary draft (VerificationFlag "
            f"{flags[0] or 'missing'}, PreliminaryFlag {flags[1] or 'missing'}); the renditions "
            "label AI drafts only")
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber",
                    "InstanceNumber", "ConceptNameCodeSequence", "ContentSequence"):
        if not sr.get(keyword):
            raise report.ReportError(f"the SR has no {keyword}; no rendition can be made of it")


def _copy_code(code: Dataset) -> Dataset:
    item = Dataset()
    for keyword in ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning"):
        if keyword in code:
            item[keyword] = code[keyword]
    return item


def is_demo(sr: Dataset) -> bool:
    """Whether the SR says it was written by a demo model (in its notices or its flags)."""
    said = [str(sr.get("CompletionFlagDescription", "")), str(sr.get("SeriesDescription", ""))]
    said += [t for s in read_sections(sr) for t in s.texts]
    return any(DEMO_LABEL in text for text in said)


# --- reading the SR ------------------------------------------------------------------------------


def read_title(sr: Dataset) -> str:
    return str(sr.ConceptNameCodeSequence[0].get("CodeMeaning", "Report"))


def read_sections(sr: Dataset) -> tuple[Section, ...]:
    """The SR's headings with their texts. Any other kind of item in a section stops the
    rendition: the page would silently say less than the SR."""
    sections = []
    for item in sr.get("ContentSequence", []):
        if item.get("ValueType") != "CONTAINER" or item.get("RelationshipType") != "CONTAINS":
            continue
        heading = str(item.ConceptNameCodeSequence[0].CodeMeaning)
        texts = []
        for child in item.get("ContentSequence", []):
            if child.get("ValueType") != "TEXT":
                raise report.ReportError(
                    f"the SR's {heading} section has a {child.get('ValueType')} item; the pdf "
                    "and page renditions show text items only")
            texts.append(str(child.TextValue))
        sections.append(Section(heading, tuple(texts)))
    return tuple(sections)


def read_page(sr: Dataset) -> DraftPage:
    """What the page shows, from the SR alone."""
    _check_draft(sr)
    sections = read_sections(sr)
    made = _datetime(sr.get("ContentDate", ""), sr.get("ContentTime", ""))
    header = [
        ("Patient", _person_name(sr, "PatientName")),
        ("Patient ID", _patient_id(sr)),
        ("Birth date", _date(_text(sr, "PatientBirthDate"))),
        ("Sex", _text(sr, "PatientSex")),
        ("Accession", _text(sr, "AccessionNumber")),
        ("Study date", f"{_date(_text(sr, 'StudyDate'))} {_time(_text(sr, 'StudyTime'))}".strip()),
        ("Study", _text(sr, "StudyDescription")),
        ("Referring", _person_name(sr, "ReferringPhysicianName")),
        ("Institution", _text(sr, "InstitutionName")),
        ("Draft made", f"{made:%Y-%m-%d %H:%M:%S}, revision {sr.InstanceNumber}"),
    ]
    observer = _device_observer(sr)
    model = [
        ("Model", observer.get("name", _text(sr, "ManufacturerModelName"))),
        ("Description", observer.get("model", "")),
        ("Versions", ", ".join(_values(sr, "SoftwareVersions"))),
        ("Fingerprint", observer.get("serial", _text(sr, "DeviceSerialNumber"))),
        ("Made by", observer.get("manufacturer", _text(sr, "Manufacturer"))),
    ]
    flags = ", ".join(str(sr.get(k, "")) for k in
                      ("PreliminaryFlag", "VerificationFlag", "CompletionFlag"))
    footer = " · ".join(v for _, v in header[:2] if v)
    return DraftPage(
        title=read_title(sr),
        status=f"Document status: {flags}",
        note=str(sr.get("CompletionFlagDescription", "") or ""),
        demo=is_demo(sr),
        header=tuple((k, v) for k, v in header if v),
        sections=sections,
        images=tuple(_images(sr)),
        model=tuple((k, v) for k, v in model if v),
        made=made,
        footer=footer,
    )


def _device_observer(sr: Dataset) -> dict[str, str]:
    found = {}
    for item in sr.get("ContentSequence", []):
        if item.get("RelationshipType") != "HAS OBS CONTEXT":
            continue
        code = item.ConceptNameCodeSequence[0]
        if code.get("CodingSchemeDesignator") == "DCM" and code.CodeValue in DEVICE_OBSERVER:
            found[DEVICE_OBSERVER[code.CodeValue]] = str(item.get("TextValue", ""))
    return found


def _images(sr: Dataset) -> Iterator[str]:
    """The images the draft was made from, by kind and series, as the evidence lists them."""
    series = [s for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
              for s in study.get("ReferencedSeriesSequence", [])]
    number = 0
    for n, item in enumerate(series, 1):
        for instance in item.get("ReferencedSOPSequence", []):
            number += 1
            kind = UID(str(instance.get("ReferencedSOPClassUID", ""))).name
            kind = kind.removesuffix(" Storage").removesuffix(" - For Presentation")
            yield f"{number}. {kind}, series {n} of {len(series)}"


def _values(sr: Dataset, keyword: str) -> list[str]:
    """The values of an attribute as text; [] when it is absent or empty."""
    value = sr.get(keyword)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]


def _text(sr: Dataset, keyword: str) -> str:
    """An attribute as DICOM writes it: several values (a source's, copied unchanged although
    only one is allowed) separated by a backslash."""
    return "\\".join(_values(sr, keyword))


def _patient_id(sr: Dataset) -> str:
    value, issuer = _text(sr, "PatientID"), _text(sr, "IssuerOfPatientID")
    return f"{value} (issuer {issuer})" if value and issuer else value


def _person_name(sr: Dataset, keyword: str) -> str:
    """A PN as a report page writes it: "FAMILY, Given Middle", other representations after."""
    return "\\".join(" = ".join(filter(None, map(_name_group, name.split("="))))
                      for name in _values(sr, keyword))


def _name_group(group: str) -> str:
    family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    return f"{', '.join(p for p in (family, first) if p)} {suffix}".strip()


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if re.fullmatch(r"\d{8}", text) else text


def _time(text: str) -> str:
    return f"{text[:2]}:{text[2:4]}" if re.fullmatch(r"\d{4}.*", text) else text


def _datetime(date: object, time: object) -> datetime:
    """The SR's content date and time (its local time, as DICOM dates are)."""
    digits = f"{date}{str(time).split('.')[0]}".ljust(14, "0")
    try:
        return datetime.strptime(digits[:14], "%Y%m%d%H%M%S")
    except ValueError:
        raise report.ReportError("the SR's ContentDate/ContentTime is not a valid date and time"
                                 ) from None


# --- fonts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fonts:
    """The configured font files that exist, and those that do not."""

    regular: tuple[Path, ...]
    bold: Path
    missing: tuple[Path, ...]

    @classmethod
    def of(cls, settings: ReportConfig) -> Fonts:
        configured = [*settings.pdf_fonts, settings.pdf_bold_font]
        missing = tuple(p for p in configured if not p.is_file())
        for essential, key in ((settings.pdf_fonts[0], "pdf_fonts (the first)"),
                               (settings.pdf_bold_font, "pdf_bold_font")):
            if essential in missing:
                raise report.ReportError(
                    f"report.{key}: the font file {essential} does not exist; install it (the "
                    "defaults come from Debian's fonts-dejavu-core, fonts-ipafont-gothic and "
                    "fonts-noto-color-emoji, which scripts/setup.sh installs) or configure "
                    "another")
        regular = tuple(p for p in settings.pdf_fonts if p not in missing)
        return cls(regular, settings.pdf_bold_font, missing)

    def check_covers(self, page: DraftPage) -> None:
        """Raise ReportError naming the first character no font has, and where it is."""
        fonts = [*self.regular, self.bold]
        for where, text in page.strings():
            for char in dict.fromkeys(text):
                if _NO_GLYPH.match(char) or unicodedata.category(char) == "Cf":
                    continue
                if not any(ord(char) in _cmap(f) for f in fonts):
                    missing = (f"; configured but missing: {', '.join(map(str, self.missing))}"
                               if self.missing else "")
                    raise report.ReportError(
                        f"{where} has U+{ord(char):04X} "
                        f"({unicodedata.name(char, 'unnamed character')}), which none of the "
                        f"fonts has ({', '.join(map(str, fonts))}){missing}; add a font that "
                        "has it to report.pdf_fonts")


def _cmap(path: Path) -> frozenset[int]:
    stat = path.stat()
    return _cmap_of(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cmap_of(path: Path, mtime_ns: int, size: int) -> frozenset[int]:
    """The code points a font file maps (cached while the file is unchanged)."""
    try:
        with TTFont(path, lazy=True, fontNumber=0) as font:
            return frozenset(font.getBestCmap() or {})
    except (OSError, TTLibError, AssertionError, KeyError, ValueError) as exc:
        raise report.ReportError(
            f"report.pdf_fonts: {path} is not a TrueType/OpenType font that can be read "
            f"({type(exc).__name__})") from None


# --- the page ------------------------------------------------------------------------------------


def render(sr: Dataset, settings: ReportConfig) -> bytes:
    """The PDF of the draft SR (the same bytes for the same SR)."""
    page = read_page(sr)
    fonts = Fonts.of(settings)
    fonts.check_covers(page)
    pdf = _DraftPDF(page, fonts)
    try:
        pdf.write()
        return bytes(pdf.output())
    except Exception as exc:  # noqa: BLE001 - a layout failure is a reason, not a crash
        raise report.ReportError(f"the PDF could not be made: {type(exc).__name__}: {exc}"
                                 ) from exc


class _DraftPDF(FPDF):
    """The page layout: the label box on top of every page, then header lines, sections, images
    and the model; a footer with the patient and "page n of N" on every page."""

    BODY, LABEL, SMALL, HEADING = 10.5, 15.0, 8.5, 12.0

    def __init__(self, page: DraftPage, fonts: Fonts) -> None:
        super().__init__(format=PAGE_FORMAT, unit="mm")
        self.page_content = page
        self.set_margins(MARGIN, MARGIN, MARGIN)
        self.set_auto_page_break(True, margin=MARGIN)
        self.add_font("body", "", fonts.regular[0])
        self.add_font("body", "B", fonts.bold)
        for n, path in enumerate(fonts.regular[1:], 1):
            self.add_font(f"fallback{n}", "", path)
        self.set_fallback_fonts(["body", *(f"fallback{n}" for n in
                                           range(1, len(fonts.regular)))], exact_match=False)
        self.set_text_shaping(True)
        self.alias_nb_pages(None)
        self.set_title(f"{TOP_LABEL}: {page.title}")
        self.set_author(dict(page.model).get("Model", ""))
        self.set_creator(CREATOR)
        self.set_producer(CREATOR)
        self.set_creation_date(page.made.astimezone())

    @property
    def width(self) -> float:
        return self.w - 2 * MARGIN

    def header(self) -> None:
        page = self.page_content
        top = 10.0
        if page.demo:
            self.set_fill_color(0)
            self.rect(MARGIN, top, self.width, 9, style="F")
            self.set_text_color(255)
            self.set_font("body", "B", 13)
            self.set_xy(MARGIN, top)
            self.cell(self.width, 9, report.DEMO_DISCLAIMER, align="C")
            self.set_text_color(0)
            top += 10
        self.set_line_width(0.8)
        self.rect(MARGIN, top, self.width, 15)
        self.set_xy(MARGIN, top + 1.5)
        self.set_font("body", "B", self.LABEL)
        self.cell(self.width, 7, TOP_LABEL, align="C", new_x="LMARGIN", new_y="NEXT")
        self.set_font("body", "", self.SMALL)
        self.cell(self.width, 5, page.note, align="C", new_x="LMARGIN", new_y="NEXT")
        self.set_y(top + 19)

    def _footer(self, number: int, total: int) -> None:
        top, left = self.h - 12, self.width * 0.58  # a long name wraps, never runs into the rest
        self.set_font("body", "", self.SMALL)
        self.set_line_width(0.2)
        self.line(MARGIN, top - 1, self.w - MARGIN, top - 1)
        self.set_xy(MARGIN + left, top)
        self.cell(self.width - left, 3.6, f"{report.SERIES_LABEL} · page {number} of {total}",
                  align="R")
        self.set_xy(MARGIN, top)
        self.multi_cell(left - 2, 3.6, self.page_content.footer, align="L")

    def write(self) -> None:
        page = self.page_content
        self.add_page()
        self.set_font("body", "B", 14)
        self._paragraph(page.title, 7)
        self.set_font("body", "", self.SMALL)
        self._paragraph(page.status, 4.5)
        self.ln(2)
        self._table(page.header, self.BODY - 1)
        for section in page.sections:
            self._rule()
            self.set_font("body", "B", self.HEADING)
            self._paragraph(section.heading, 7)
            self.set_font("body", "", self.BODY)
            for text in section.texts:
                self._paragraph(_lines(text), 5.2)
                self.ln(1.5)
        self._rule()
        self.set_font("body", "B", self.BODY - 1)
        self._paragraph(f"Images read ({len(page.images)})", 5.5)
        self.set_font("body", "", self.BODY - 1.5)
        for line in page.images:
            self._paragraph(line, 4.6)
        self.ln(2)
        self.set_font("body", "B", self.BODY - 1)
        self._paragraph("Drafted by", 5.5)
        self._table(page.model, self.BODY - 1.5)
        # Footers last, when the page count is known: fpdf2's "{nb}" placeholder would also
        # replace those characters in the report's own text.
        self.set_auto_page_break(False)
        total = self.page_no()
        for number in range(1, total + 1):
            self.page = number
            self._footer(number, total)

    def _paragraph(self, text: str, height: float) -> None:
        self.multi_cell(self.width, height, text, align="L", new_x="LMARGIN", new_y="NEXT")

    def _table(self, rows: Sequence[tuple[str, str]], size: float) -> None:
        for label, value in rows:
            self.set_font("body", "B", size)
            self.cell(32, size * 0.5, label)
            self.set_font("body", "", size)
            self.multi_cell(self.width - 32, size * 0.5, value, align="L", new_x="LMARGIN",
                            new_y="NEXT")

    def _rule(self) -> None:
        self.ln(2)
        self.set_line_width(0.3)
        self.line(MARGIN, self.get_y(), self.w - MARGIN, self.get_y())
        self.ln(2)


def _lines(text: str) -> str:
    """DICOM text's line breaks (CR LF, CR, LF, FF) as the line breaks of the page."""
    return re.sub(r"\r\n?|\f", "\n", text)
