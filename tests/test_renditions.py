"""The draft where the radiologist looks: the PDF and page renditions of real draft SRs.

Each rendition is built from an SR of a real chest X-ray (tests/samples.py), checked by dciodvfy
and dcentvfy, and read back as a person would see it: poppler's pdftotext and pdftoppm (an
independent PDF reader and rasteriser) and pdfinfo/pdffonts for what the file holds besides the
page. Then through the real Reporter and Outbox to a folder, and into Orthanc by C-STORE.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicomgen import make_cxr
from pacs import Orthanc, running_orthanc
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage
from sr_validation import assert_valid_dicom
from test_dispatch import run
from test_report import FINGERPRINT, MULTILINGUAL, header_copy, raw_value, worker_result
from test_worker_results import Node, result

from cxr_node import renditions
from cxr_node.config import ReportConfig
from cxr_node.dispatch import Outbox
from cxr_node.logs import quiet_libraries
from cxr_node.renditions import page, pdf
from cxr_node.report import (
    COMPLETION_DESCRIPTION,
    DEMO_DISCLAIMER,
    DISCLAIMER,
    DraftReport,
    ReportError,
    build_draft_sr,
    inherited_nonconformant,
    write_sr,
)
from cxr_node.store import InstanceRecord, StudyState

SETTINGS = ReportConfig(institution_name="Example Hospital")
LABEL = "AI PRELIMINARY DRAFT — NOT VERIFIED"
# MULTILINGUAL up to its Arabic, which a PDF stores in visual order (pdftotext reorders it)
JAPANESE_LINE = "Heart size normal. 心臓の大きさは正常。 Η καρδιά είναι φυσιολογική."
ANY_SCRIPT_IMPRESSION = "正常 — Φυσιολογικό — طبيعي 👍"
DPI = 200
A4_PIXELS = (2339, 1654)  # rows, columns at 200 dpi
MM = DPI / 25.4  # pixels per millimetre
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription")  # fmt: skip


# --- building blocks ---------------------------------------------------------------------------


def sr_of(images: list[Path], *, revision: int = 1, supersedes: Path | None = None,
          **changes: Any) -> Dataset:
    """A draft SR of real images as the Reporter builds it (``worker_result`` changes merged)."""
    report = DraftReport.from_result(worker_result(**changes))
    return build_draft_sr(images, report, SETTINGS, revision=revision, supersedes=supersedes)


def written(document: Dataset, sr: Dataset, path: Path) -> Path:
    """The rendition written as the Reporter writes it: with its SR's inherited values."""
    write_sr(document, path, inherited_nonconformant(sr))
    return path


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH: install the Debian package poppler-utils",
                    pytrace=False)
    return found


def poppler(name: str, *args: str | Path) -> str:
    done = subprocess.run([tool(name), *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"{name}: {done.stderr}"
    return done.stdout


def pdf_file(document: Dataset, path: Path) -> Path:
    """The encapsulated PDF, without the DICOM padding byte, as a file poppler reads."""
    path.write_bytes(document.EncapsulatedDocument[: document.EncapsulatedDocumentLength])
    return path


def pdf_text(document: Dataset, tmp_path: Path) -> str:
    """What pdftotext reads from the page, each run of white space one space."""
    text = poppler("pdftotext", "-enc", "UTF-8", pdf_file(document, tmp_path / "text.pdf"), "-")
    return " ".join(text.split())


def info(document: Dataset, tmp_path: Path) -> dict[str, str]:
    lines = poppler("pdfinfo", "-enc", "UTF-8", pdf_file(document, tmp_path / "info.pdf"))
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                 lines.splitlines())}


def pixels(document: Dataset) -> np.ndarray:
    """The page image's frames: (frames, rows, columns)."""
    frames = int(document.get("NumberOfFrames", 1))
    return np.frombuffer(document.PixelData, np.uint8).reshape(
        frames, document.Rows, document.Columns)


def iso_date(value: object) -> str:
    """A DICOM date as the page writes it: 1940-03-05."""
    text = str(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


def dark(region: np.ndarray) -> float:
    """The share of a region's pixels that are ink rather than paper."""
    return float((region < 128).mean())


@pytest.fixture
def rg1(cxr_dir: Path) -> Path:
    return cxr_dir / "RG1_J2KI.dcm"


# --- the DICOM objects ---------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["RG1_J2KI.dcm", "CR-MONO1-10-chest.dcm"])
def test_pdf_and_page_are_valid_objects_in_the_images_study(
    cxr_dir: Path, tmp_path: Path, sample: str
) -> None:
    source = cxr_dir / sample
    sr = sr_of([source])
    sr_path = tmp_path / "sr.dcm"
    write_sr(sr, sr_path)
    series = {sr.SeriesInstanceUID}
    kinds = [("pdf", EncapsulatedPDFStorage, "DOC"), ("page", SecondaryCaptureImageStorage, "OT")]
    for offset, (rendition, sop_class, modality) in enumerate(kinds, 1):
        document = renditions.BUILDERS[rendition](sr, SETTINGS)
        path = written(document, sr, tmp_path / f"{rendition}.dcm")
        assert_valid_dicom(path, source)  # dciodvfy: 0 errors; dcentvfy: same patient and study
        ds = pydicom.dcmread(path)
        assert (ds.SOPClassUID, ds.Modality) == (sop_class, modality)
        assert (ds.BurnedInAnnotation, ds.ConversionType) == ("YES", "WSD")
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.SeriesNumber == sr.SeriesNumber + offset and ds.SeriesInstanceUID not in series
        series.add(ds.SeriesInstanceUID)
        assert ds.SeriesDescription == f"AI PRELIMINARY DRAFT ({rendition.upper()}) — NOT VERIFIED"
        assert ds.InstanceNumber == sr.InstanceNumber
        (source_item,) = ds.SourceInstanceSequence
        assert (source_item.ReferencedSOPClassUID, source_item.ReferencedSOPInstanceUID) == (
            sr.SOPClassUID, sr.SOPInstanceUID)
        # patient and study exactly as the SR carries them, byte for byte
        copied = [e.keyword for e in sr if e.tag.group == 0x0010] + list(STUDY_KEYWORDS)
        for keyword in copied:
            assert raw_value(path, keyword) == raw_value(sr_path, keyword), keyword


def test_pdf_instance_encapsulates_the_pdf_as_ps3_3_says(rg1: Path) -> None:
    sr = sr_of([rg1])
    document = pdf.build(sr, SETTINGS)
    data = document.EncapsulatedDocument
    assert len(data) % 2 == 0 and document.EncapsulatedDocumentLength in (len(data), len(data) - 1)
    assert data.startswith(b"%PDF-") and data[: document.EncapsulatedDocumentLength].rstrip(
        ).endswith(b"%%EOF")
    assert document.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert document.VerificationFlag == "UNVERIFIED"
    assert document.DocumentTitle == f"{LABEL}: Diagnostic Imaging Report"
    (title,) = document.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")


# --- what the PDF says ---------------------------------------------------------------------------


def test_pdf_says_what_the_sr_says(rg1: Path, tmp_path: Path) -> None:
    sr = sr_of([rg1])
    text = pdf_text(pdf.build(sr, SETTINGS), tmp_path)
    report = worker_result()
    assert f"Findings {report['findings']}" in text
    assert f"Impressions {report['impression']}" in text
    for said in (LABEL, COMPLETION_DESCRIPTION, DISCLAIMER, "PRELIMINARY, UNVERIFIED, PARTIAL"):
        assert said in text
    # the header lines of a report page, as the SR has them
    for label, value in [
        ("Patient", ", ".join(str(sr.PatientName).split("^"))),
        ("Patient ID", sr.PatientID),
        ("Birth date", iso_date(sr.PatientBirthDate)),
        ("Accession", sr.AccessionNumber),
        ("Study date", iso_date(sr.StudyDate)),
        ("Draft made", iso_date(sr.ContentDate)),
    ]:
        assert label in text and value in text, label
    # the model and the images it read
    for said in ("medgemma-4b-it", "1.0.1, cxr-node", FINGERPRINT,
                 "Images read (1) 1. Computed Radiography Image, series 1 of 1"):
        assert said in text
    assert "DEMO" not in text


def test_pdf_keeps_any_script_the_sr_holds(rg1: Path, tmp_path: Path) -> None:
    sr = sr_of([rg1], findings=MULTILINGUAL, impression=ANY_SCRIPT_IMPRESSION)
    text = pdf_text(pdf.build(sr, SETTINGS), tmp_path)
    assert JAPANESE_LINE in text
    assert "No effusion — «ok» ½ ‰ ∑." in text
    assert "正常 — Φυσιολογικό —" in text
    for word in ("حجم", "القلب", "طبيعي", "🫁", "✅", "👍"):  # each drawn, none dropped
        assert word in text, word


def test_text_that_looks_like_a_layout_code_is_shown_as_it_is(rg1: Path, tmp_path: Path) -> None:
    """fpdf2 replaces "{nb}" anywhere on a page with the page count; the SR's words stay."""
    sr = sr_of([rg1], findings="Nodule {nb} of {nb}. **Not bold** <b>no tag</b> $x$ \\ %s",
               impression="{nb}")
    text = pdf_text(pdf.build(sr, SETTINGS), tmp_path)
    assert "Findings Nodule {nb} of {nb}. **Not bold** <b>no tag</b> $x$ \\ %s" in text
    assert "Impressions {nb}" in text and "page 1 of 1" in text


def test_demo_label_only_where_the_sr_carries_it(rg1: Path, tmp_path: Path) -> None:
    demo = sr_of([rg1], model={"demo": True, "name": "cxr-demo-tiny"})
    text = pdf_text(pdf.build(demo, SETTINGS), tmp_path)
    assert text.count(DEMO_DISCLAIMER) == 2  # the black band on top, and the SR's notice
    for build in (pdf.build, page.build):
        assert build(demo, SETTINGS).SeriesDescription.startswith("DEMO MODEL — ")
    assert "DEMO" not in pdf_text(pdf.build(sr_of([rg1]), SETTINGS), tmp_path)


def test_a_character_no_font_has_stops_the_rendition_by_name(rg1: Path) -> None:
    """fpdf2 on its own draws nothing for a character no font has, and says nothing."""
    sr = sr_of([rg1], findings="Heart size normal. 𓀀")
    for build in (pdf.build, page.build):
        with pytest.raises(ReportError, match=r"^the Findings section has U\+13000 \(EGYPTIAN "
                           r"HIEROGLYPH A001\), which none of the fonts has \(/usr/share/fonts/"
                           r"truetype/dejavu/DejaVuSans.ttf, .*\); add a font that has it to "
                           r"report.pdf_fonts$"):
            build(sr, SETTINGS)


def test_font_files_that_are_missing_or_not_fonts_are_named(rg1: Path, tmp_path: Path) -> None:
    dejavu, *_ = SETTINGS.pdf_fonts
    absent = tmp_path / "absent.ttf"
    japanese = sr_of([rg1], findings=JAPANESE_LINE)
    only_latin = ReportConfig(pdf_fonts=[dejavu, absent])
    with pytest.raises(ReportError, match=rf"U\+5FC3 \(CJK UNIFIED IDEOGRAPH-5FC3\), which none "
                       rf"of the fonts has .*; configured but missing: {absent};"):
        pdf.build(japanese, only_latin)
    pdf.build(sr_of([rg1]), only_latin)  # a missing fallback the text does not need is no matter

    with pytest.raises(ReportError, match=rf"^report.pdf_fonts \(the first\): the font file "
                       rf"{absent} does not exist; install it"):
        pdf.build(sr_of([rg1]), ReportConfig(pdf_fonts=[absent]))
    with pytest.raises(ReportError, match=rf"^report.pdf_bold_font: the font file {absent} "):
        page.build(sr_of([rg1]), ReportConfig(pdf_bold_font=absent))

    garbage = tmp_path / "garbage.ttf"
    garbage.write_bytes(b"not a font at all")
    with pytest.raises(ReportError, match=rf"report.pdf_fonts: {garbage} is not a "
                       "TrueType/OpenType font that can be read"):
        pdf.build(japanese, ReportConfig(pdf_fonts=[dejavu, garbage]))


def test_pdf_holds_nothing_beyond_the_page(rg1: Path, tmp_path: Path) -> None:
    """Metadata only from what the page shows, every font embedded as a subset, no JavaScript,
    no actions, no links."""
    sr = sr_of([rg1], findings=MULTILINGUAL)
    document = pdf.build(sr, SETTINGS)
    text = pdf_text(document, tmp_path)
    meta = info(document, tmp_path)
    assert meta["Title"] == f"{LABEL}: Diagnostic Imaging Report"
    assert all(part in text for part in meta["Title"].split(": "))
    assert meta["Author"] == "medgemma-4b-it" and meta["Author"] in text
    assert meta["Creator"] == meta["Producer"] and meta["Creator"] in text
    assert "Subject" not in meta and "Keywords" not in meta
    assert (meta["JavaScript"], meta["Encrypted"], meta["Pages"]) == ("no", "no", "1")
    for identifier in (sr.PatientID, str(sr.PatientName), sr.AccessionNumber):
        assert identifier not in str(meta)

    fonts = poppler("pdffonts", pdf_file(document, tmp_path / "fonts.pdf")).splitlines()[2:]
    assert len(fonts) == 4  # DejaVu Sans, its bold, IPA P Gothic, Noto Color Emoji (Type 3)
    for line in fonts:
        emb, sub = line.split()[-5:-3]
        assert emb == "yes" and (sub == "yes" or "Type 3" in line), line

    data = document.EncapsulatedDocument
    for token in (b"/JavaScript", b"/JS", b"/AA", b"/URI", b"/Launch", b"/GoToR", b"/SubmitForm",
                  b"/Annots", b"/EmbeddedFile", b"/AcroForm", b"/Names"):
        assert token not in data, token
    assert data.count(b"/OpenAction") == 1 and b"/OpenAction [3 0 R /FitH null]" in data  # a view


def test_building_a_pdf_logs_nothing_of_its_text(
    rg1: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fontTools' subsetter lists at INFO every glyph a PDF uses; the node's logging keeps only
    its warnings."""
    settings = pydicom.config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    levels = {name: logging.getLogger(name).level
              for name in ("pynetdicom", "highdicom", "fontTools", "pydicom")}
    try:
        quiet_libraries()
        with caplog.at_level(logging.DEBUG):
            pdf.build(sr_of([rg1], findings=JAPANESE_LINE), SETTINGS)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert [r.name for r in caplog.records if r.name.startswith("fontTools")] == []


def test_only_an_unverified_draft_gets_renditions(rg1: Path) -> None:
    sr = sr_of([rg1])
    sr.VerificationFlag = "VERIFIED"
    for build in (pdf.build, page.build):
        with pytest.raises(ReportError, match="the SR is not an unverified preliminary draft "
                           r"\(VerificationFlag VERIFIED, PreliminaryFlag PRELIMINARY\)"):
            build(sr, SETTINGS)


def test_an_sr_item_the_page_cannot_show_stops_the_rendition(rg1: Path) -> None:
    sr = sr_of([rg1])
    findings = next(i for i in sr.ContentSequence if i.get("ValueType") == "CONTAINER"
                    and i.ConceptNameCodeSequence[0].CodeValue == "59776-5")
    findings.ContentSequence[0].ValueType = "CODE"
    with pytest.raises(ReportError, match="the SR's Findings section has a CODE item"):
        pdf.build(sr, SETTINGS)


# --- the page image ------------------------------------------------------------------------------


def test_page_is_the_pdf_page_as_another_rasteriser_draws_it(rg1: Path, tmp_path: Path) -> None:
    sr = sr_of([rg1])
    image = page.build(sr, SETTINGS)
    assert (image.PhotometricInterpretation, image.SamplesPerPixel) == ("MONOCHROME2", 1)
    assert (image.BitsAllocated, image.BitsStored, image.HighBit) == (8, 8, 7)
    assert "NumberOfFrames" not in image and (image.Rows, image.Columns) == A4_PIXELS
    (frame,) = pixels(image)

    pdftoppm = tmp_path / "poppler"
    poppler("pdftoppm", "-gray", "-r", str(DPI), "-singlefile",
            pdf_file(pdf.build(sr, SETTINGS), tmp_path / "page.pdf"), pdftoppm)
    reference = np.asarray(Image.open(f"{pdftoppm}.pgm"))
    assert reference.shape == frame.shape
    assert 0.01 < dark(frame) < 0.2  # text on paper
    assert ((frame < 128) == (reference < 128)).mean() > 0.99  # the same page

    # the label: bold text inside the box at the top (10 mm down, 15 mm high, inside margins)
    box = frame[round(12 * MM):round(24 * MM), round(20 * MM):round(190 * MM)]
    assert dark(box) > 0.05
    assert dark(frame[round(1 * MM):round(9 * MM)]) == 0  # paper above it


def test_demo_page_shows_the_black_band(rg1: Path) -> None:
    (frame,) = pixels(page.build(sr_of([rg1], model={"demo": True}), SETTINGS))
    band = frame[round(11 * MM):round(18 * MM), round(20 * MM):round(190 * MM)]
    assert dark(band) > 0.6  # white letters on black
    (plain,) = pixels(page.build(sr_of([rg1]), SETTINGS))
    assert dark(plain[round(11 * MM):round(18 * MM), round(20 * MM):round(190 * MM)]) < 0.3


def test_a_long_draft_is_one_frame_per_page_none_cut_off(rg1: Path, tmp_path: Path) -> None:
    findings = " ".join(f"{i}. {JAPANESE_LINE}" for i in range(100))  # about 7,000 characters
    sr = sr_of([rg1], findings=findings)
    document = pdf.build(sr, SETTINGS)
    pages = int(info(document, tmp_path)["Pages"])
    text = pdf_text(document, tmp_path)
    assert all(f"NOT VERIFIED · page {n} of {pages}" in text for n in range(1, pages + 1))
    image = page.build(sr, SETTINGS)
    path = written(image, sr, tmp_path / "page.dcm")
    assert_valid_dicom(path, rg1)
    assert pages > 1 and image.NumberOfFrames == pages
    assert image.SOPClassUID == pydicom.uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    assert list(image.PageNumberVector) == list(range(1, pages + 1))
    for frame in pixels(image):  # every page carries the label
        assert dark(frame[round(12 * MM):round(24 * MM), round(20 * MM):round(190 * MM)]) > 0.05


def test_a_draft_too_long_for_an_image_gets_no_page_but_a_reason(rg1: Path) -> None:
    """6,000 characters of line breaks fill 64 pages: 250 MB of pixels, refused before any is
    drawn."""
    sr = sr_of([rg1], findings="\n".join(["x"] * 3000))
    with pytest.raises(ReportError, match=rf"^the draft fills 64 pages; the page rendition holds "
                       rf"at most {page.MAX_PAGES}"):
        page.build(sr, SETTINGS)
    pdf.build(sr, SETTINGS)  # the PDF shows it whole


# --- identity: the same draft, the same instance ---------------------------------------------


def test_a_rebuilt_draft_is_the_same_instance_and_another_draft_a_new_one(
    rg1: Path, tmp_path: Path
) -> None:
    sr = sr_of([rg1])
    path = tmp_path / "sr.dcm"
    write_sr(sr, path)
    read_back = pydicom.dcmread(path)
    other = sr_of([rg1], model={"fingerprint": "0" * 64})
    for build, content in ((pdf.build, "EncapsulatedDocument"), (page.build, "PixelData")):
        first, again = build(sr, SETTINGS), build(sr, SETTINGS)
        from_file = build(read_back, SETTINGS)
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", content):
            assert first[keyword].value == again[keyword].value == from_file[keyword].value
        new = build(other, SETTINGS)
        assert new.SOPInstanceUID != first.SOPInstanceUID
        assert new.SeriesInstanceUID == first.SeriesInstanceUID  # one series per study
    rooted = ReportConfig(uid_root="1.2.826.0.1.3680043.10.999")
    document = pdf.build(build_draft_sr([rg1], DraftReport.from_result(worker_result()), rooted),
                         rooted)
    assert document.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")
    assert document.SeriesInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")


def test_a_superseding_draft_has_renditions_of_its_own_that_say_so(
    rg1: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    later = cxr_dir / "RG1_JLSN.dcm"  # a later exposure in RG1's study
    first = sr_of([rg1])
    write_sr(first, tmp_path / "rev1.dcm")
    second = sr_of([rg1, later], revision=2, supersedes=tmp_path / "rev1.dcm",
                   findings="Both exposures: the lungs are clear.")
    for build in (pdf.build, page.build):
        old, new = build(first, SETTINGS), build(second, SETTINGS)
        assert new.SOPInstanceUID != old.SOPInstanceUID
        assert new.SeriesInstanceUID == old.SeriesInstanceUID and new.InstanceNumber == 2
        assert_valid_dicom(written(new, second, tmp_path / "new.dcm"), later)
    text = pdf_text(pdf.build(second, SETTINGS), tmp_path)
    assert (f"This draft supersedes the earlier AI draft (revision 1), SOP Instance UID "
            f"{first.SOPInstanceUID}; read this one instead.") in text
    assert "Both exposures: the lungs are clear." in text and "Images read (2)" in text
    assert "supersedes" not in pdf_text(pdf.build(first, SETTINGS), tmp_path)


def test_nonconformant_source_values_reach_the_renditions_unchanged(
    cxr_dir: Path, rg1: Path, tmp_path: Path
) -> None:
    """The 966 export: its 56-character accession is on the PDF and in both objects, unchanged;
    dciodvfy's only errors are about it. Two values where one is allowed are shown as DICOM
    writes them."""
    source = cxr_dir / "RG1_DX_J2KR.dcm"
    sr = sr_of([source])
    for build in (pdf.build, page.build):
        path = written(build(sr, SETTINGS), sr, tmp_path / "document.dcm")
        assert raw_value(path, "AccessionNumber") == raw_value(source, "AccessionNumber")
        assert_valid_dicom(path, source, nonconformant_source=["AccessionNumber"])
    accession = pydicom.dcmread(source, stop_before_pixels=True).AccessionNumber
    assert "".join(accession.split()) in pdf_text(pdf.build(sr, SETTINGS), tmp_path).replace(
        " ", "")  # wrapped over lines, every character there

    two = sr_of([header_copy(rg1, tmp_path / "two.dcm", SpecificCharacterSet="ISO_IR 192",
                             AccessionNumber="A1\\A2",
                             PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")])
    text = pdf_text(pdf.build(two, SETTINGS), tmp_path)
    assert "A1\\A2" in text and "Yamada, Tarou = 山田, 太郎 = やまだ, たろう" in text


# --- through the Reporter and the Outbox -------------------------------------------------------


def share(folder: Path) -> dict[str, Any]:
    return {"type": "folder", "name": "share", "folder": str(folder),
            "renditions": ["sr", "pdf", "page"]}


def reported(node: Node, study_uid: str) -> tuple[str, dict[str, str]]:
    """Answer the study's draft task and run the report stage: the SR's UID and
    {rendition: SOP Instance UID} as the documents table records them."""
    job = node.submitted(study_uid)
    node.answer(job, [result(job)])
    node.steps()
    study = node.study(study_uid)
    assert study.state == StudyState.REPORTED, study.reason
    (sr_uid,) = [r["sr_uid"] for r in node.store.db.execute(
        "SELECT sr_uid FROM reports WHERE study_uid = ? AND revision = ?",
        (study_uid, study.revision))]
    documents = {r["rendition"]: r for r in node.store.db.execute(
        "SELECT * FROM documents WHERE sr_uid = ?", (sr_uid,))}
    for rendition, row in documents.items():
        if row["path"] is None:
            continue  # could not be built: the reason is in row["problem"]
        ds = pydicom.dcmread(row["path"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == row["sop_instance_uid"], rendition
        assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr_uid
        assert ds.StudyInstanceUID == row["study_uid"] == study_uid
    return sr_uid, {r: row["sop_instance_uid"] for r, row in documents.items()}


def test_the_reporter_builds_and_records_them_and_the_outbox_delivers_all_three(
    tmp_path: Path
) -> None:
    folder = tmp_path / "share"
    node = Node(tmp_path, destinations=[share(folder)])
    study_uid = node.stable_study()
    sr_uid, documents = reported(node, study_uid)
    assert set(documents) == {"pdf", "page"}
    run(Outbox(node.config, node.store))
    assert node.study(study_uid).state == StudyState.SENT
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{uid}.dcm" for uid in (sr_uid, *documents.values()))
    delivered = pydicom.dcmread(folder / f"{documents['pdf']}.dcm")
    # this node cannot vouch for the worker's model: the draft, and so its PDF, is a DEMO
    assert DEMO_DISCLAIMER in pdf_text(delivered, tmp_path)


def test_a_rendition_that_cannot_be_made_costs_only_the_destinations_that_asked_for_it(
    tmp_path: Path
) -> None:
    absent = tmp_path / "fonts" / "DejaVuSans.ttf"
    sr_only = {"type": "folder", "name": "sr-only", "folder": str(tmp_path / "sr-only")}
    node = Node(tmp_path, destinations=[share(tmp_path / "share"), sr_only],
                report={"pdf_fonts": [str(absent)]})
    study_uid = node.stable_study()
    sr_uid, documents = reported(node, study_uid)
    assert documents == {"pdf": None, "page": None}
    problems = {r["rendition"]: r["problem"] for r in node.store.db.execute(
        "SELECT rendition, problem FROM documents WHERE sr_uid = ?", (sr_uid,))}
    assert all(f"the font file {absent} does not exist" in p for p in problems.values())
    run(Outbox(node.config, node.store))
    assert [p.name for p in (tmp_path / "sr-only").iterdir()] == [f"{sr_uid}.dcm"]
    rows = {r["destination"]: r for r in node.store.db.execute("SELECT * FROM outbox")}
    assert rows["sr-only"]["state"] == "delivered"
    assert rows["share"]["state"] == "dead"
    assert rows["share"]["reason"].startswith("the pdf rendition could not be built: ")
    study = node.study(study_uid)
    assert study.state == StudyState.FAILED and "dispatch to share failed" in study.reason


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


def late_image(node: Node, study_uid: str, first: Path) -> Path:
    """A lateral view of the same study arriving after its draft: the study's next revision."""
    header = pydicom.dcmread(first, stop_before_pixels=True)
    ds = make_cxr(study_uid, view="LL", rows=128, columns=128, seed=7,
                  series_uid=header.SeriesInstanceUID, InstanceNumber=2)
    path = node.images / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    node.store.record_instance(InstanceRecord(
        ds.SOPInstanceUID, study_uid, ds.SeriesInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1",
        "CR", "CHEST", "LL", "LATERAL", 2, str(path), path.stat().st_size, "MODALITY",
        "127.0.0.1"), same_content=lambda _: False)
    assert node.store.move(node.study(study_uid), StudyState.STABLE, "test")
    return path


@pytest.mark.slow
def test_sr_pdf_and_page_land_in_the_images_study_and_a_late_image_supersedes_all_three(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    pacs = {"type": "dicom", "name": "pacs", "ae_title": Orthanc.AE_TITLE, "host": "127.0.0.1",
            "port": Orthanc.DICOM_PORT, "renditions": ["sr", "pdf", "page"]}
    node = Node(tmp_path, destinations=[pacs])
    study_uid = node.stable_study()
    (image,) = node.images.iterdir()
    assert orthanc.store([image]) == {str(image): "Success"}
    image_series = pydicom.dcmread(image, stop_before_pixels=True).SeriesInstanceUID

    drafts = []
    for revision in (1, 2):
        if revision == 2:
            late = late_image(node, study_uid, image)
            assert orthanc.store([late]) == {str(late): "Success"}
        sr_uid, documents = reported(node, study_uid)
        run(Outbox(node.config, node.store), orthanc.ns)
        assert node.study(study_uid).state == StudyState.SENT
        uids = {"sr": sr_uid, **documents}
        ids = {r: orthanc.find(uid) for r, uid in uids.items()}
        assert all(len(found) == 1 for found in ids.values()), ids
        series = {r: orthanc.tags(found[0])["SeriesInstanceUID"] for r, found in ids.items()}
        assert len({*series.values(), image_series}) == 4  # each in a series of its own
        for rendition, (found,) in ids.items():
            assert orthanc.study_uid_of(found) == study_uid, rendition
            stored = tmp_path / f"orthanc-{rendition}-{revision}.dcm"
            stored.write_bytes(orthanc.file(found))
            if rendition != "sr":
                assert_valid_dicom(stored, image)
        drafts.append((uids, series, tmp_path / f"orthanc-pdf-{revision}.dcm"))

    (old, old_series, _), (new, new_series, new_pdf) = drafts
    assert not set(old.values()) & set(new.values()) and new_series == old_series
    text = pdf_text(pydicom.dcmread(new_pdf), tmp_path)
    assert "This draft supersedes the earlier AI draft (revision 1)" in text
    assert "Images read (2)" in text
