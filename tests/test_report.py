"""The AI draft as a DICOM SR, built from the real sample chest X-rays and checked two ways.

Every SR written here passes dciodvfy, dsrdump and dcentvfy (tests/sr_validation.py), and each
test also checks what those validators cannot see: evidence, template, flags, character set and
the text itself, byte for byte, after write_sr and dcmread.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import structlog
import yaml
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sr_validation import DCIODVFY_VR_SUMMARY, assert_valid_sr, dciodvfy_errors, names_attribute

from cxr_node import audit, cli, renditions
from cxr_node.audit import AuditTrail, read_trail
from cxr_node.config import ReportConfig, load_config
from cxr_node.dispatch import Outbox, requeue
from cxr_node.report import (
    DEMO_DISCLAIMER,
    DISCLAIMER,
    MAX_INHERITED_CHARACTERS,
    DraftReport,
    ModelIdentity,
    Reporter,
    ReportError,
    build_draft_sr,
    inherited_nonconformant,
    sign_off_cue,
    write_sr,
)
from cxr_node.show import HIDDEN, render_sr
from cxr_node.store import InstanceRecord, Store, StudyState

FINGERPRINT = "3f" * 32
MULTILINGUAL = (
    "Heart size normal. 心臓の大きさは正常。 Η καρδιά είναι φυσιολογική. "
    "حجم القلب طبيعي. 🫁✅\r\nNo effusion — «ok» ½ ‰ ∑."
)
SETTINGS = ReportConfig(institution_name="Example Hospital")


def worker_result(**changes: Any) -> dict[str, Any]:
    """A result dict as the worker returns it; ``model`` and ``timings`` changes are merged."""
    result: dict[str, Any] = {
        "request_id": "req-1",
        "ok": True,
        "findings": "The lungs are clear. No pleural effusion or pneumothorax.",
        "impression": "No acute cardiopulmonary abnormality.",
        "reason": None,
        "text": "FINDINGS: The lungs are clear. IMPRESSION: No acute abnormality.",
        "notes": [],
        "model": {
            "name": "medgemma-4b-it",
            "version": "1.0.1",
            "architecture": "gemma3",
            "quantization": "nf4",
            "adapter": None,
            "fingerprint": FINGERPRINT,
            "demo": False,
        },
        "timings": {
            "generate_seconds": 3.2,
            "batch_size": 2,
            "new_tokens": 87,
            "worker": "gpu-0",
            "device": "cuda:0",
        },
    }
    for key in ("model", "timings"):
        if isinstance(changes.get(key), dict):
            result[key].update(changes.pop(key))
    result.update(changes)
    return result


def draft(**changes: Any) -> DraftReport:
    return DraftReport.from_result(worker_result(**changes))


def header_copy(source: Path, target: Path, **values: Any) -> Path:
    """A header-only Part-10 copy of ``source`` with some attributes changed (None: removed)."""
    ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture
def rg1(cxr_dir: Path) -> Path:
    return cxr_dir / "RG1_J2KI.dcm"


@pytest.fixture
def lateral(rg1: Path, tmp_path: Path) -> Path:
    """A second view of RG1's study: same header, new SOP Instance UID, ViewPosition LL."""
    uid = str(generate_uid(entropy_srcs=["lateral of RG1"]))
    return header_copy(rg1, tmp_path / "lateral.dcm", SOPInstanceUID=uid, ViewPosition="LL")


def written(ds: Dataset, path: Path) -> Dataset:
    write_sr(ds, path)
    return pydicom.dcmread(path)


# --- what validators cannot see ----------------------------------------------------------------


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def texts(ds: Dataset, code: tuple[str, str]) -> list[str]:
    return [i.TextValue for i in content_items(ds) if i.ValueType == "TEXT" and concept(i) == code]


def sections(ds: Dataset) -> list[tuple[str, str]]:
    return [concept(i) for i in ds.ContentSequence if i.ValueType == "CONTAINER"]


def evidence_uids(ds: Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def check_draft(path: Path, sources: list[Path], report: DraftReport) -> Dataset:
    """Everything a draft SR must be that dciodvfy and dsrdump do not check."""
    raw = path.read_bytes()
    sr = pydicom.dcmread(path)
    headers = [pydicom.dcmread(s, stop_before_pixels=True, force=True) for s in sources]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert sr.Modality == "SR"
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert sr.CompletionFlagDescription
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert sr.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert concept(sr) == ("18748-4", "LN")
    assert sr.StudyInstanceUID == headers[0].StudyInstanceUID
    assert sr.PatientID == headers[0].get("PatientID", "")
    assert evidence_uids(sr) == {h.SOPInstanceUID for h in headers}
    assert "NOT VERIFIED" in sr.SeriesDescription
    assert sr.SeriesNumber == SETTINGS.series_number
    assert sr.Manufacturer == SETTINGS.manufacturer
    # language, then a device observer whose UID is also the author's DeviceUID
    language = sr.ContentSequence[0]
    assert concept(language) == ("121049", "DCM")
    assert language.ConceptCodeSequence[0].CodeValue == "en"
    context = [i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]
    observer = {concept(i): i for i in context}
    assert observer[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121007"
    device_uid = observer[("121012", "DCM")].UID
    assert observer[("121013", "DCM")].TextValue == report.model.name
    assert observer[("121016", "DCM")].TextValue == report.model.fingerprint
    author = sr.AuthorObserverSequence[0]
    assert (author.ObserverType, author.DeviceUID) == ("DEV", device_uid)
    assert sr.ManufacturerModelName == report.model.name
    assert sr.DeviceSerialNumber == report.model.fingerprint
    assert report.model.version in sr.SoftwareVersions
    processing = [
        e
        for e in sr.ContributingEquipmentSequence
        if report.model.fingerprint in e.get("ContributionDescription", "")
    ]
    assert processing and processing[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    # the text: first the disclaimer, then the draft exactly as the model wrote it
    assert sections(sr)[0] == ("121106", "DCM")
    assert DISCLAIMER in texts(sr, ("121106", "DCM"))
    assert (DEMO_DISCLAIMER in texts(sr, ("121106", "DCM"))) == report.model.demo
    assert texts(sr, ("121071", "DCM")) == [report.findings]
    assert report.findings.encode("utf-8") in raw
    if report.impression:
        assert sections(sr)[1:] == [("59776-5", "LN"), ("19005-8", "LN")]
        assert texts(sr, ("121073", "DCM")) == [report.impression]
        assert report.impression.encode("utf-8") in raw
    else:
        assert sections(sr)[1:] == [("59776-5", "LN")]
    # highdicom reads it back as the same document
    assert hd.sr.srread(path).SOPInstanceUID == sr.SOPInstanceUID
    return sr


# --- SRs from the real images ------------------------------------------------------------------


def test_sr_from_a_file_without_meta_header(
    cxr_dir: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    source = cxr_dir / "CR-MONO1-10-chest.dcm"
    report = draft()
    path = tmp_path / "draft.dcm"
    write_sr(build_draft_sr([source], report, SETTINGS), path)
    # highdicom warns about one-component names, quoting them: it must never see the patient's
    assert not [w for w in recwarn if "Anonymized" in str(w.message)]
    assert_valid_sr(path, source)
    sr = check_draft(path, [source], report)
    assert sr.PatientName == "Anonymized"
    assert sr.InstitutionName == "Example Hospital"
    assert sr.InstanceNumber == 1


def test_sr_from_latin1_source_carries_any_script(rg1: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(rg1, stop_before_pixels=True)
    assert source.SpecificCharacterSet == "ISO_IR 100"
    report = draft(findings=MULTILINGUAL, impression="正常 — Φυσιολογικό — طبيعي 👍")
    path = tmp_path / "draft.dcm"
    write_sr(build_draft_sr([rg1], report, SETTINGS), path)
    assert_valid_sr(path, rg1)
    sr = check_draft(path, [rg1], report)
    assert report.findings == MULTILINGUAL
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):  # fmt: skip
        assert sr.get(keyword) == source.get(keyword), keyword


def test_sr_for_a_two_image_study(rg1: Path, lateral: Path, tmp_path: Path) -> None:
    report = draft()
    path = tmp_path / "draft.dcm"
    write_sr(build_draft_sr([rg1, lateral], report, SETTINGS), path)
    assert_valid_sr(path, rg1)
    assert_valid_sr(path, lateral)
    sr = check_draft(path, [rg1, lateral], report)
    assert len(evidence_uids(sr)) == 2


def test_demo_model_is_labelled_everywhere_a_reader_looks(rg1: Path, tmp_path: Path) -> None:
    report = draft(model={"demo": True, "name": "cxr-demo-tiny"})
    path = tmp_path / "draft.dcm"
    write_sr(build_draft_sr([rg1], report, SETTINGS), path)
    assert_valid_sr(path, rg1)
    sr = check_draft(path, [rg1], report)
    assert sr.SeriesDescription.startswith("DEMO MODEL — ")
    assert "DEMO MODEL" in sr.CompletionFlagDescription
    assert texts(sr, ("121106", "DCM"))[0] == DEMO_DISCLAIMER
    assert "DEMO MODEL" in render_sr(sr)


def test_long_report_without_impression(rg1: Path, tmp_path: Path) -> None:
    paragraph = MULTILINGUAL + "\n"
    findings = (paragraph * (10_240 // len(paragraph.encode()) + 1)).strip()
    assert len(findings.encode()) > 10_000
    report = draft(findings=findings, impression="")
    path = tmp_path / "draft.dcm"
    write_sr(build_draft_sr([rg1], report, SETTINGS), path)
    assert_valid_sr(path, rg1)
    check_draft(path, [rg1], report)


def test_text_is_normalised_once_and_then_kept(rg1: Path, tmp_path: Path) -> None:
    report = draft(findings="  Lungs clear.\tHeart normal.\n\n", impression="\tNormal. ")
    assert (report.findings, report.impression) == ("Lungs clear. Heart normal.", "Normal.")
    sr = written(build_draft_sr([rg1], report, SETTINGS), tmp_path / "draft.dcm")
    assert texts(sr, ("121071", "DCM")) == ["Lungs clear. Heart normal."]


# --- UIDs ---------------------------------------------------------------------------------------


def uids(sr: Dataset) -> tuple[str, str, str]:
    return sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.AuthorObserverSequence[0].DeviceUID


def test_same_draft_gets_the_same_uids(rg1: Path, lateral: Path) -> None:
    first = build_draft_sr([rg1, lateral], draft(), SETTINGS)
    again = build_draft_sr([lateral, rg1], draft(), SETTINGS)  # order of images does not matter
    assert uids(first) == uids(again)
    assert first.SOPInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID)


def test_new_model_revision_or_input_gives_a_new_instance_in_the_same_series(
    rg1: Path, lateral: Path, tmp_path: Path
) -> None:
    base = build_draft_sr([rg1], draft(), SETTINGS)
    other_model = build_draft_sr([rg1], draft(model={"fingerprint": "0" * 64}), SETTINGS)
    revision_2 = build_draft_sr([rg1], draft(), SETTINGS, revision=2)
    more_images = build_draft_sr([rg1, lateral], draft(), SETTINGS)
    # same SOP Instance UID, different file content (a corrected header) -> a different draft
    changed = header_copy(rg1, tmp_path / "changed.dcm", ImageComments="re-sent")
    changed_file = build_draft_sr([changed], draft(), SETTINGS)
    variants = [base, other_model, revision_2, more_images, changed_file]
    assert len({v.SOPInstanceUID for v in variants}) == len(variants)
    assert len({v.SeriesInstanceUID for v in variants}) == 1
    assert uids(other_model)[2] != uids(base)[2]  # new weights, new device observer
    assert uids(revision_2)[2] == uids(base)[2]
    assert revision_2.InstanceNumber == 2


def test_uid_root_is_used(rg1: Path) -> None:
    settings = ReportConfig(uid_root="1.2.826.0.1.3680043.10.999")
    sr = build_draft_sr([rg1], draft(), settings)
    assert all(uid.startswith("1.2.826.0.1.3680043.10.999.") for uid in uids(sr))
    assert sr.SeriesInstanceUID != build_draft_sr([rg1], draft(), SETTINGS).SeriesInstanceUID


# --- supersedes ---------------------------------------------------------------------------------


def test_new_draft_supersedes_the_earlier_one(rg1: Path, lateral: Path, tmp_path: Path) -> None:
    earlier = written(build_draft_sr([rg1], draft(), SETTINGS), tmp_path / "rev1.dcm")
    report = draft(findings="Both views: lungs clear.")
    path = tmp_path / "rev2.dcm"
    rev2 = build_draft_sr(
        [rg1, lateral], report, SETTINGS, supersedes=tmp_path / "rev1.dcm", revision=2
    )
    write_sr(rev2, path)
    assert_valid_sr(path, lateral)
    sr = check_draft(path, [rg1, lateral], report)
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (
        earlier.StudyInstanceUID,
        earlier.SeriesInstanceUID,
    )
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        earlier.SOPClassUID,
        earlier.SOPInstanceUID,
    )
    notes = [t for t in texts(sr, ("121106", "DCM")) if "supersedes" in t]
    assert len(notes) == 1 and earlier.SOPInstanceUID in notes[0]
    assert sr.SeriesInstanceUID == earlier.SeriesInstanceUID
    assert earlier.SOPInstanceUID in render_sr(sr)


def test_supersedes_must_be_an_earlier_draft_of_this_study(
    rg1: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    rev2 = tmp_path / "rev2.dcm"
    write_sr(build_draft_sr([rg1], draft(), SETTINGS, revision=2), rev2)
    with pytest.raises(ReportError, match="revision 2 does not follow .* revision 2"):
        build_draft_sr([rg1], draft(), SETTINGS, supersedes=rev2, revision=2)
    other_study = cxr_dir / "CR-MONO1-10-chest.dcm"
    with pytest.raises(ReportError, match="different StudyInstanceUID"):
        build_draft_sr([other_study], draft(), SETTINGS, supersedes=rev2, revision=3)
    with pytest.raises(ReportError, match="not an SR document"):
        build_draft_sr([rg1], draft(), SETTINGS, supersedes=rg1, revision=3)


# --- malformed results --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ok": False, "reason": "degenerate"}, r"result\.ok: the worker reported a failure"),
        ({"ok": False}, r"result: expected a reason with ok: false"),
        ({"reason": "why not"}, r"result: expected no reason with ok: true"),
        ({"ok": "yes"}, r"result\.ok: expected a valid boolean"),
        ({"findings": None}, r"result\.findings: expected a valid string"),
        ({"findings": " \n\t "}, r"findings: empty"),
        ({"findings": "ok\x00"}, r"findings: control character U\+0000 at position 2"),
        ({"impression": "a\x1b[1mb"}, r"impression: control character U\+001B at position 1"),
        ({"findings": "No \u202etnemtaert\u202c"},
         r"findings: text direction control U\+202E at position 3 would make the text read"),
        ({"findings": "lone \udc80 surrogate"}, r"result\.findings: expected a valid string"),
        ({"findings": "x" * 100_001}, r"result\.findings: string should have at most 100000"),
        ({"request_id": ""}, r"result\.request_id: string should have at least 1 character"),
        ({"notes": ["fine", 3]}, r"result\.notes\[1\]: expected a valid string"),
        ({"notes": ["n"] * 65}, r"result\.notes: list should have at most 64 items"),
        ({"model": {"fingerprint": "abc"}}, r"result\.model\.fingerprint: string should match"),
        ({"model": {"fingerprint": "AB" * 32}}, r"result\.model\.fingerprint: string should match"),
        ({"model": {"demo": 1}}, r"result\.model\.demo: expected a valid boolean"),
        ({"model": {"adapter": 7}}, r"result\.model\.adapter: expected a valid string"),
        ({"model": {"name": "a\\b"}}, r"result\.model\.name: expected a text without backslash"),
        ({"model": {"version": "v" * 65}}, r"model\.version: expected at most 64 bytes in UTF-8"),
        ({"model": {"name": "é" * 33}}, r"model\.name: expected at most 64 bytes in UTF-8"),
        ({"model": {"architecture": " "}}, r"model\.architecture: expected a non-empty text"),
        ({"model": {"serial": "x"}}, r"result\.model\.serial: extra inputs are not permitted"),
        ({"signature": "Dr X"}, r"result\.signature: extra inputs are not permitted"),
        ({"timings": {"batch_size": -1}}, r"timings\.batch_size: expected greater than or equal to 0"),
        ({"timings": {"batch_size": True}}, r"timings\.batch_size: expected a valid integer"),
        ({"timings": {"generate_seconds": "3"}}, r"timings\.generate_seconds: expected a valid number"),
        ({"model": None}, r"result\.model: expected a valid dictionary"),
    ],
)
def test_malformed_results_are_refused_precisely(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportError, match=message):
        draft(**changes)


def test_missing_fields_are_named() -> None:
    for path in (("findings",), ("reason",), ("model", "fingerprint"), ("timings", "device")):
        result = worker_result()
        container = result if len(path) == 1 else result[path[0]]
        del container[path[-1]]
        with pytest.raises(ReportError) as failure:
            DraftReport.from_result(result)
        assert str(failure.value) == f"result.{'.'.join(path)}: field required"
    with pytest.raises(ReportError, match="result: expected a valid dictionary"):
        DraftReport.from_result([])  # type: ignore[arg-type]


def test_model_identity_validates_when_built_directly() -> None:
    model = worker_result()["model"]
    with pytest.raises(ValidationError, match="fingerprint"):
        ModelIdentity(**{**model, "fingerprint": "x"})
    with pytest.raises(ReportError, match="model: expected a ModelIdentity"):
        DraftReport("Lungs clear.", "Normal.", model)  # type: ignore[arg-type]


# --- what a draft may say -------------------------------------------------------------------------


def test_draft_text_is_bounded_by_the_configured_limit() -> None:
    findings, impression = "Lungs clear. " * 50, "Normal chest."
    total = len(findings.strip()) + len(impression)
    assert draft(findings=findings, impression=impression).findings  # the default limit: 8000
    result = worker_result(findings=findings, impression=impression)
    assert DraftReport.from_result(result, max_characters=total).impression == impression
    with pytest.raises(ReportError, match=rf"{total} characters, more than "
                                          rf"limits\.max_draft_characters \({total - 1}\)"):
        DraftReport.from_result(result, max_characters=total - 1)


@pytest.mark.parametrize(
    ("where", "text", "cue"),
    [
        ("findings", "Lungs clear.\nElectronically signed: Dr X", "a signature"),
        ("findings", "Normal.\nDigitally signed by John Smith on 2024-01-01", "a signature"),
        ("impression", "Normal chest. Signed: J. Smith", "a signature"),
        ("impression", "No acute disease. /s/ Jane Doe", "a signature"),
        ("impression", "FINAL REPORT. Normal chest.", "a final status"),
        ("findings", "Report status: Final. Lungs clear.", "a final status"),
        ("findings", "This report has been finalized.", "a final status"),
        ("impression", "Normal. Verified by: Dr Who", "a verification"),
        ("impression", "I have personally reviewed the images and agree.", "a verification"),
        ("impression", "Normal. Dictated by Dr X, transcribed by Y", "a dictation"),
        ("findings", "Attending radiologist: Dr X. Lungs clear.", "a reading physician"),
        ("impression", "ADDENDUM: the nodule is stable.", "an addendum"),
        ("findings", "CORRECTED REPORT: lungs clear.", "an amended report"),
        ("impression", "Normal chest. John Smith, MD", "a physician's credentials"),
        # hidden from a plain search: full-width letters, a zero-width space, a line break
        ("impression", "ＦＩＮＡＬ ＲＥＰＯＲＴ", "a final status"),
        ("impression", "Electronically\u200b signed", "a signature"),
        ("impression", "electronically\nsigned", "a signature"),
    ],
)
def test_wording_of_a_signature_or_final_status_is_refused(where: str, text: str, cue: str) -> None:
    with pytest.raises(ReportError) as refused:
        draft(**{where: text})
    assert str(refused.value).startswith(f"{where} imitates {cue} (")


@pytest.mark.parametrize(
    "text",
    [
        "No final diagnosis can be made on this single view.",
        "Finally, the cardiac silhouette is normal.",
        "Final position of the catheter tip is in the SVC.",
        "Signs of hyperinflation. No signal abnormality.",
        "The patient was assigned to the upright position.",
        "Attending physicians should correlate clinically.",  # no label, no colon
        "Compared with the prior study reviewed today.",
        "Status post median sternotomy. Status post CABG.",
        "Findings discussed with Dr. ___ by ___ at 10:30.",
        "MD-level follow-up is advised; dictation artifacts absent.",
        "Verified tube position: tip 4 cm above the carina.",
        "Mild cardiomegaly. Pulmonary vascular congestion, possibly early edema.",
    ],
)
def test_real_report_prose_is_not_taken_for_a_sign_off(text: str) -> None:
    assert sign_off_cue(text) is None
    assert draft(findings=text).findings == text


# --- source values as the images carry them -----------------------------------------------------


def raw_value(path: Path, keyword: str) -> bytes:
    """The value of ``keyword`` as the file holds it: bytes, before any decoding."""
    return pydicom.dcmread(path, stop_before_pixels=True, force=True).get_item(keyword).value


def test_nonconformant_accession_is_copied_byte_for_byte_and_said(
    cxr_dir: Path, tmp_path: Path
) -> None:
    """RG1_DX_J2KR.dcm: the PACS filed the images under a 56-character AccessionNumber (SH allows
    16), so the draft is filed under the same one; only that value makes dciodvfy complain."""
    source = cxr_dir / "RG1_DX_J2KR.dcm"
    header = pydicom.dcmread(source, stop_before_pixels=True)
    report = draft()
    path = tmp_path / "draft.dcm"
    with structlog.testing.capture_logs() as logs:
        ds = build_draft_sr({"instance 7 (PA)": source}, report, SETTINGS)
        write_sr(ds, path)
    assert len(raw_value(source, "AccessionNumber")) == 56
    assert raw_value(path, "AccessionNumber") == raw_value(source, "AccessionNumber")
    assert [v.note for v in inherited_nonconformant(ds)] == [
        "AccessionNumber (SH): 56 characters, at most 16"]

    errors = dciodvfy_errors(path)
    assert errors[-1] == DCIODVFY_VR_SUMMARY
    assert errors[:-1] and all(names_attribute(e, "AccessionNumber") for e in errors[:-1])
    assert_valid_sr(path, source, nonconformant_source=["AccessionNumber"])  # dcentvfy agrees
    sr = check_draft(path, [source], report)
    assert sr.PatientName == header.PatientName and sr.PatientID == header.PatientID
    assert texts(sr, ("121106", "DCM"))[1:] == [
        "Source value left out: PatientBirthDate (not a valid DA value).",
        "Source value copied unchanged although not valid DICOM: AccessionNumber (SH): "
        "56 characters, at most 16.",
    ]
    assert sr.PatientBirthDate == ""  # the hashed birth date is not a date

    said = [e for e in logs if e["event"] == "report.inherited_nonconformant"]
    assert said == [{"event": "report.inherited_nonconformant", "log_level": "warning",
                     "attribute": "AccessionNumber", "vr": "SH",
                     "reason": "56 characters, at most 16", "source": "instance 7 (PA)"}]
    for identifier in (header.AccessionNumber, str(header.PatientName), header.PatientID,
                       header.SOPInstanceUID, "RG1_DX_J2KR"):
        assert identifier not in str(logs)


@pytest.mark.parametrize(
    ("keyword", "value", "note"),
    [
        ("PatientID", "P" * 70, "PatientID (LO): 70 characters, at most 64"),
        ("IssuerOfPatientID", "Example\x07Hospital", "IssuerOfPatientID (LO): contains control "
                                                     "characters"),
        ("PatientName", "A^B^C^D^E^F", "PatientName (PN): not a valid PN value (at most 3 groups "
                                       "of 5 components, 64 characters each)"),
        ("AccessionNumber", "A1\\A2", "AccessionNumber (SH): 2 values where one is allowed"),
    ],
)
def test_every_nonconformant_identifier_is_copied_unchanged(
    rg1: Path, tmp_path: Path, keyword: str, value: str, note: str
) -> None:
    source = header_copy(rg1, tmp_path / "source.dcm", **{keyword: value})
    path = tmp_path / "draft.dcm"
    ds = build_draft_sr([source], draft(), SETTINGS)
    write_sr(ds, path)
    assert raw_value(path, keyword) == raw_value(source, keyword)
    assert [v.note for v in inherited_nonconformant(ds)] == [note]
    assert_valid_sr(path, source, nonconformant_source=[keyword])


def test_latin1_identifiers_arrive_as_the_same_text_in_utf8(rg1: Path, tmp_path: Path) -> None:
    name, accession = "Müller^Jörg", "ÄÖÜ-" * 5  # the accession also breaks SH: 20 characters
    source = header_copy(rg1, tmp_path / "latin1.dcm", PatientName=name, AccessionNumber=accession)
    assert pydicom.dcmread(source).SpecificCharacterSet == "ISO_IR 100"
    assert raw_value(source, "PatientName").rstrip(b" ") == name.encode("latin-1")
    path = tmp_path / "draft.dcm"
    ds = build_draft_sr([source], draft(), SETTINGS)
    write_sr(ds, path)
    assert raw_value(path, "PatientName").rstrip(b" ") == name.encode("utf-8")
    assert raw_value(path, "AccessionNumber").rstrip(b" ") == accession.encode("utf-8")
    sr = pydicom.dcmread(path)
    assert (sr.SpecificCharacterSet, sr.PatientName, sr.AccessionNumber) == (
        "ISO_IR 192", name, accession)
    assert [v.note for v in inherited_nonconformant(ds)] == [
        "AccessionNumber (SH): 20 characters, at most 16"]
    assert_valid_sr(path, source, nonconformant_source=["AccessionNumber"])


def test_iso_2022_japanese_name_arrives_as_the_same_text_in_utf8(
    rg1: Path, tmp_path: Path
) -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    source = header_copy(rg1, tmp_path / "jis.dcm", SpecificCharacterSet=["", "ISO 2022 IR 87"],
                         PatientName=name)
    assert b"\x1b$B" in raw_value(source, "PatientName")  # escape sequences to JIS X 0208
    path = tmp_path / "draft.dcm"
    ds = build_draft_sr([source], draft(), SETTINGS)
    write_sr(ds, path)
    assert raw_value(path, "PatientName").rstrip(b" ") == name.encode("utf-8")
    assert pydicom.dcmread(path).PatientName == name
    assert inherited_nonconformant(ds) == ()
    assert_valid_sr(path, source)


def test_undeclared_non_ascii_is_read_as_latin1_and_said(rg1: Path, tmp_path: Path) -> None:
    """No Specific Character Set, yet bytes above 0x7F: read as ISO 8859-1, as pydicom and
    Orthanc read them, and listed as not conformant."""
    source = header_copy(rg1, tmp_path / "source.dcm", SpecificCharacterSet=None,
                         PatientName="MXller^Jorg")
    source.write_bytes(source.read_bytes().replace(b"MXller", "Müller".encode("latin-1")))
    ds = build_draft_sr([source], draft(), SETTINGS)
    write_sr(ds, tmp_path / "draft.dcm")
    assert pydicom.dcmread(tmp_path / "draft.dcm").PatientName == "Müller^Jorg"
    assert [v.note for v in inherited_nonconformant(ds)] == [
        "PatientName (PN): bytes above 0x7F and no Specific Character Set that defines them "
        "(read as ISO 8859-1)"]


@pytest.mark.parametrize(
    ("character_set", "value", "message"),
    [
        ("ISO_IR 192", "Müller".encode("latin-1"),
         r"^source image 1: PatientName is not text in its character set \(ISO_IR 192\)"),
        (["", "ISO 2022 IR 87"], b"\x1b$B\x7f\x7f\x1b(B",  # no JIS X 0208 character
         r"^source image 1: PatientName is not text in its character set "
         r"\(\\ISO 2022 IR 87\)"),
        ("ISO_IR 999", "Müller".encode("latin-1"),
         r"^source image 1: PatientName cannot be read: Specific Character Set ISO_IR 999 is "
         r"not one DICOM defines"),
        ("ISO_IR 100", b"M" * (MAX_INHERITED_CHARACTERS + 1),
         rf"^source image 1: PatientName has {MAX_INHERITED_CHARACTERS + 1} characters, more than "
         rf"the {MAX_INHERITED_CHARACTERS} an identifier copied unchanged may have"),
    ],
)
def test_identifier_whose_text_is_unknown_or_absurd_fails_the_draft(
    rg1: Path, tmp_path: Path, character_set: str | list[str], value: bytes, message: str
) -> None:
    """Copied unchanged means the same text: bytes that are no text in the declared character set
    are never guessed, and a value no PACS files as an identifier is refused."""
    placeholder = b"Q" * len(value)
    source = header_copy(rg1, tmp_path / "source.dcm", SpecificCharacterSet=character_set,
                         PatientName=placeholder.decode())
    source.write_bytes(source.read_bytes().replace(placeholder, value))
    with pytest.raises(ReportError, match=message) as failure:
        build_draft_sr([source], draft(), SETTINGS)
    assert "Müller" not in str(failure.value) and "MMMM" not in str(failure.value)


def test_values_the_node_writes_are_still_checked(cxr_dir: Path, tmp_path: Path) -> None:
    """Only the identifying values copied from the images pass unchecked, each by its element and
    its exact value: everything the node writes itself is checked as before."""
    source = cxr_dir / "RG1_DX_J2KR.dcm"
    path = tmp_path / "draft.dcm"
    control = ReportConfig(institution_name="Example\x01Hospital")
    with pytest.raises(ReportError, match=r"invalid InstitutionName \(LO\): contains control"):
        write_sr(build_draft_sr([source], draft(), control), path)
    ds = build_draft_sr([source], draft(), SETTINGS)

    def finding(sr: Dataset) -> Dataset:
        return sr.ContentSequence[-2].ContentSequence[0]

    def nested_accession(sr: Dataset) -> None:  # the source's value, but not where it came from
        request = Dataset()
        request.AccessionNumber = sr.AccessionNumber
        sr.ReferencedRequestSequence = [request]

    changes = [
        ("TextValue", lambda sr: setattr(finding(sr), "TextValue", "Lungs\x01clear.")),
        ("AccessionNumber", lambda sr: setattr(sr, "AccessionNumber", "Y" * 56)),  # not the same
        ("PatientName", lambda sr: setattr(sr, "PatientName", "A^B^C^D^E^F")),
        ("AccessionNumber", nested_accession),
    ]
    for name, change in changes:
        changed = copy.deepcopy(ds)
        change(changed)
        with pytest.raises(ReportError, match=rf"the SR has an invalid {name} "):
            write_sr(changed, path)
    assert list(tmp_path.iterdir()) == []
    write_sr(ds, path)
    assert raw_value(path, "AccessionNumber") == raw_value(source, "AccessionNumber")


def rendition_copy(sr: Dataset, settings: ReportConfig) -> Dataset:
    """A stand-in rendition: a new object with the SR's patient and study values, as a PDF or a
    page image of the draft carries them."""
    document = Dataset()
    document.update(sr)
    document.file_meta = copy.deepcopy(sr.file_meta)
    document.SOPInstanceUID = document.file_meta.MediaStorageSOPInstanceUID = str(
        generate_uid(entropy_srcs=[sr.SOPInstanceUID, "copy"]))
    return document


def test_reporter_files_the_draft_and_says_which_source_value_is_not_conformant(
    cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 966 export through the report and dispatch stages: reported and sent with a note on
    the accession (never its value) in the status, the audit trail and the log, also after a
    dead letter and a requeue."""
    source = cxr_dir / "RG1_DX_J2KR.dcm"
    header = pydicom.dcmread(source, stop_before_pixels=True)
    share = tmp_path / "share"
    config_path = tmp_path / "cxr-node.yaml"
    config_path.write_text(yaml.safe_dump({
        "node": {"state_dir": str(tmp_path / "state")},
        "destinations": [{"type": "folder", "name": "share", "folder": str(share),
                          "renditions": ["sr", "pdf"]}],
    }))
    config = load_config(config_path)
    monkeypatch.setitem(renditions.BUILDERS, "pdf", rendition_copy)
    monkeypatch.setattr(audit, "_trail", AuditTrail(config.audit_path))
    store = Store(config.database_path)
    store.record_instance(InstanceRecord(
        header.SOPInstanceUID, header.StudyInstanceUID, header.SeriesInstanceUID,
        header.SOPClassUID, header.file_meta.TransferSyntaxUID, "DX", "CHEST", "PA", "PA", 1,
        str(source), source.stat().st_size, "MODALITY1", "127.0.0.1"), same_content=lambda _: False)
    [instance] = store.instances(header.StudyInstanceUID)
    with store.transaction() as db:
        for state in (StudyState.STABLE, StudyState.QUEUED, StudyState.DRAFTED):
            assert store.transition(db, store.study(header.StudyInstanceUID), state)
        db.execute(
            """INSERT INTO jobs (study_uid, revision, attempt, state, task_id, inputs, result,
               created_at) VALUES (?, 1, 1, 'done', 'task-1', ?, ?, 0)""",
            (header.StudyInstanceUID,
             json.dumps({"images": [{"instance_id": instance["id"], "view": "PA",
                                     "path": str(source)}]}),
             json.dumps(worker_result())))
    outbox = Outbox(config, store)
    note = ("source values not valid DICOM, copied unchanged: AccessionNumber (SH): "
            "56 characters, at most 16")

    def send() -> StudyState:
        outbox.step()
        assert outbox.wait(timeout=60)
        return store.study(header.StudyInstanceUID).state

    with structlog.testing.capture_logs() as logs:
        assert Reporter(config, store, outbox).step() == 1
        study = store.study(header.StudyInstanceUID)
        assert (study.state, study.reason) == (StudyState.REPORTED, f"draft SR built; {note}")
        # someone else's file under the draft's name: a dead letter, then a requeue
        [sr_uid] = [r["sr_uid"] for r in store.db.execute("SELECT sr_uid FROM reports")]
        share.mkdir(mode=0o700)
        (share / f"{sr_uid}.dcm").write_bytes(b"someone else's file")
        assert send() == StudyState.FAILED
        (share / f"{sr_uid}.dcm").unlink()
        assert requeue(store, all_failed=True) == 1
        assert send() == StudyState.SENT
    assert store.study(header.StudyInstanceUID).reason == note

    copies = sorted(share.iterdir())
    assert len(copies) == 2  # the SR and its rendition, both under the source's accession
    for document in copies:
        assert raw_value(document, "AccessionNumber") == raw_value(source, "AccessionNumber")
    reported, requeued = [r for r in read_trail(config.audit_path).records
                          if r["event"] == "study.reported"]
    assert requeued["reason"] == "outbox re-queued"
    assert reported["nonconformant_source_values"] == [
        "AccessionNumber (SH): 56 characters, at most 16"]
    assert reported["renditions"] == ["pdf"]
    [sent] = [r for r in read_trail(config.audit_path).records if r["event"] == "study.sent"]
    assert sent["reason"] == note

    assert cli.main(["status", "--config", str(config_path)]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if study.study_key in line]
    assert " sent " in row and row.endswith(note)
    text = str(logs) + row + config.audit_path.read_text()
    for identifier in (header.AccessionNumber, str(header.PatientName), header.PatientID):
        assert identifier not in text


def test_invalid_optional_value_is_left_out_and_said(cxr_dir: Path, tmp_path: Path) -> None:
    """RG1_DX_J2KR.dcm with a valid accession: the hashed birth date is dropped, never rewritten."""
    source = header_copy(cxr_dir / "RG1_DX_J2KR.dcm", tmp_path / "dx.dcm", AccessionNumber="A966")
    hashed_birth_date = pydicom.dcmread(source).PatientBirthDate
    report = draft()
    path = tmp_path / "draft.dcm"
    with structlog.testing.capture_logs() as logs:
        write_sr(build_draft_sr([source], report, SETTINGS), path)
    assert_valid_sr(path, source)
    sr = check_draft(path, [source], report)
    assert sr.PatientBirthDate == ""
    assert "PatientBirthDate" in sr  # Type 2: present, empty
    assert hashed_birth_date.encode() not in path.read_bytes()
    said = [t for t in texts(sr, ("121106", "DCM")) if "PatientBirthDate" in t]
    assert said == ["Source value left out: PatientBirthDate (not a valid DA value)."]
    omitted = [e for e in logs if e["event"] == "report.source_value_omitted"]
    assert [e["attribute"] for e in omitted] == ["PatientBirthDate"]
    assert [e["source"] for e in omitted] == ["source image 1"]  # a handle, not the file name
    assert hashed_birth_date not in str(logs) and source.name not in str(logs)


def test_images_of_different_studies_or_patients_are_refused(
    rg1: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ReportError, match="disagree on StudyInstanceUID"):
        build_draft_sr([rg1, cxr_dir / "CR-MONO1-10-chest.dcm"], draft(), SETTINGS)
    other_patient = header_copy(
        rg1, tmp_path / "other.dcm", SOPInstanceUID=str(generate_uid()), PatientID="OTHER-1"
    )
    with pytest.raises(ReportError, match="disagree on PatientID") as failure:
        build_draft_sr([rg1, other_patient], draft(), SETTINGS)
    assert "OTHER-1" not in str(failure.value) and "9RG1" not in str(failure.value)
    with pytest.raises(ReportError, match="same instance"):
        build_draft_sr([rg1, rg1], draft(), SETTINGS)
    with pytest.raises(ReportError, match="no source image"):
        build_draft_sr([], draft(), SETTINGS)


def test_unreadable_source_is_named_by_its_handle_not_its_file(tmp_path: Path) -> None:
    """Spool file names can hold a SOP Instance UID: messages never repeat them."""
    uid = "1.2.826.0.1.3680043.8.498.1234567890"
    junk = tmp_path / f"{uid}.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ReportError, match=r"^source image 1: SOPClassUID is missing"):
        build_draft_sr([junk], draft(), SETTINGS)
    gone = tmp_path / f"{uid}.9.dcm"
    with pytest.raises(ReportError) as failure:
        build_draft_sr({"instance 3 (LATERAL)": gone}, draft(), SETTINGS)
    assert str(failure.value) == "instance 3 (LATERAL): cannot be read (No such file or directory)"


# --- writing ------------------------------------------------------------------------------------


def test_write_refuses_an_invalid_value_and_leaves_nothing(rg1: Path, tmp_path: Path) -> None:
    sr = build_draft_sr([rg1], draft(), SETTINGS)
    sr.AccessionNumber = "X" * 17
    with pytest.raises(ReportError,
                       match=r"invalid AccessionNumber \(SH\): 17 characters, at most 16"):
        write_sr(sr, tmp_path / "draft.dcm")
    nested = build_draft_sr([rg1], draft(), SETTINGS)
    nested.AuthorObserverSequence[0].DeviceUID = "1.2.03"
    with pytest.raises(ReportError, match="invalid DeviceUID"):
        write_sr(nested, tmp_path / "draft.dcm")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_the_file_whole(rg1: Path, tmp_path: Path) -> None:
    path = tmp_path / "draft.dcm"
    path.write_bytes(b"stale")
    sr = build_draft_sr([rg1], draft(), SETTINGS)
    write_sr(sr, path)
    write_sr(sr, path)
    assert pydicom.dcmread(path).SOPInstanceUID == sr.SOPInstanceUID
    assert [p.name for p in tmp_path.iterdir()] == ["draft.dcm"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# --- the validators themselves ----------------------------------------------------------------


def test_validation_fails_loudly(
    rg1: Path, cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each check of assert_valid_sr catches what it is there for; none of them is a no-op."""
    sr = build_draft_sr([rg1], draft(), SETTINGS)
    tab = copy.deepcopy(sr)
    tab.ContentSequence[-1].ContentSequence[0].TextValue = "a\tb"  # UT allows no TAB
    tab.save_as(tmp_path / "tab.dcm", enforce_file_format=True)
    with pytest.raises(pytest.fail.Exception, match=r"dciodvfy tab.dcm: 2 error\(s\)"):
        assert_valid_sr(tmp_path / "tab.dcm")
    no_type = copy.deepcopy(sr)
    del no_type.ContentSequence[-1].ContentSequence[0].ValueType  # dciodvfy misses this one
    no_type.save_as(tmp_path / "no_type.dcm", enforce_file_format=True)
    with pytest.raises(pytest.fail.Exception, match="dsrdump"):
        assert_valid_sr(tmp_path / "no_type.dcm")
    good = tmp_path / "good.dcm"
    write_sr(sr, good)
    renamed = header_copy(rg1, tmp_path / "renamed.dcm", PatientName="Someone^Else")
    with pytest.raises(pytest.fail.Exception, match="dcentvfy good.dcm renamed.dcm"):
        assert_valid_sr(good, renamed)
    with pytest.raises(AssertionError, match="differ in StudyInstanceUID"):
        assert_valid_sr(good, cxr_dir / "CR-MONO1-10-chest.dcm")  # dcentvfy alone says nothing
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="dciodvfy not found on PATH"):
        assert_valid_sr(good)


# --- show ---------------------------------------------------------------------------------------


def test_render_our_sr_hides_phi_by_default(rg1: Path, tmp_path: Path) -> None:
    report = draft(findings=MULTILINGUAL)
    sr = written(build_draft_sr([rg1], report, SETTINGS), tmp_path / "draft.dcm")
    text = render_sr(sr)
    for line in MULTILINGUAL.splitlines():
        assert line in text
    for expected in (DISCLAIMER, "Comprehensive SR Storage", "completion PARTIAL",
                     "verification UNVERIFIED", "preliminary PRELIMINARY", sr.StudyInstanceUID,
                     sr.SeriesInstanceUID, sr.SeriesDescription, "medgemma-4b-it",
                     sr.AuthorObserverSequence[0].DeviceUID, "1 instance(s) of this procedure",
                     "Predecessor:     none", "[TID 2000]"):  # fmt: skip
        assert expected in text, expected
    for phi in ("CompressedSamples", "9RG1", "19400305", "exam Number"):
        assert phi not in text
    assert f"Patient:         {HIDDEN}" in text
    assert "Problems" not in text
    shown = render_sr(sr, phi=True)
    for phi in ("CompressedSamples^RG1", "9RG1", "19400305", "exam Number"):
        assert phi in shown


def foreign_sr(evidence: Dataset) -> hd.sr.ComprehensiveSR:
    """An SR that is not ours: a person observer, a subject name in the tree, a NUM item."""
    subject = hd.sr.PnameContentItem(
        name=codes.DCM.SubjectName, value="Doe^Jane", relationship_type="HAS OBS CONTEXT"
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Rad^Ann"),
    )
    size = hd.sr.NumContentItem(
        name=codes.SCT.Diameter,
        value=42.5,
        unit=codes.UCUM.Millimeter,
        relationship_type="CONTAINS",
    )
    note = hd.sr.TextContentItem(
        name=codes.DCM.Finding, value="Nodule, right upper lobe.", relationship_type="CONTAINS"
    )
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = hd.sr.ContentSequence([*observer, subject, note, size])
    return hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=str(generate_uid()),
        series_number=7,
        sop_instance_uid=str(generate_uid()),
        instance_number=1,
        manufacturer="Someone Else",
    )


def test_render_foreign_sr(rg1: Path, tmp_path: Path) -> None:
    header = pydicom.dcmread(rg1, stop_before_pixels=True)
    path = tmp_path / "foreign.dcm"
    foreign_sr(header).save_as(path, enforce_file_format=True)
    assert_valid_sr(path, rg1)
    text = render_sr(pydicom.dcmread(path))
    assert 'contains NUM "Diameter" = 42.5 mm' in text
    assert 'contains TEXT "Finding" = Nodule, right upper lobe.' in text
    assert 'has obs context PNAME "Person Observer Name" = Rad^Ann' in text
    assert f'has obs context PNAME "Subject Name" = {HIDDEN}' in text
    assert "Doe^Jane" not in text and "CompressedSamples" not in text
    assert "Doe^Jane" in render_sr(pydicom.dcmread(path), phi=True)


def test_render_dcmtk_sample() -> None:
    sample = pydicom.dcmread(pydicom.data.get_testdata_file("test-SR.dcm"))
    text = render_sr(sample)
    assert "Comprehensive SR Storage" in text
    assert 'contains NUM "Diameter" = 3 cm' in text
    assert "Inferred Sample Text" in text
    assert "-> item 1.3.2 (by reference)" in text
    assert str(sample.PatientName) not in text


def test_render_malformed_sr_says_what_is_wrong(rg1: Path) -> None:
    sr = build_draft_sr([rg1], draft(), SETTINGS)
    broken = copy.deepcopy(sr)
    del broken.ContentSequence[-1].ContentSequence[0].TextValue
    del broken.ContentSequence[-2].ValueType
    del broken.CurrentRequestedProcedureEvidenceSequence
    text = render_sr(broken)
    assert DISCLAIMER in text
    assert "item 1.10.1: TEXT without TextValue" in text
    assert "item 1.9: no ValueType" in text
    assert "no evidence" in text
    not_sr = render_sr(pydicom.dcmread(rg1, stop_before_pixels=True))
    assert "not an SR document" in not_sr and "Modality is CR, not SR" in not_sr
