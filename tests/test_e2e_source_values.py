"""A study whose images carry an identifier that is not valid DICOM, through the whole path: the
PACS filed the images under it, so the draft lands beside them under the same value.

RG1_DX_J2KR.dcm (tests/samples.py) is the export the rule was written for: a 56-character
AccessionNumber (SH allows 16) and a hashed birth date.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from nodeproc import DEMO_MODEL, NodeProcess, storescu, wait_for, write_config
from pacs import Orthanc, running_orthanc
from sr_validation import assert_valid_sr

from cxr_node.audit import read_trail

pytestmark = pytest.mark.slow

NOTE = "AccessionNumber (SH): 56 characters, at most 16"


def test_draft_is_filed_beside_images_whose_accession_is_not_valid_dicom(
    tmp_path: Path, cxr_dir: Path
) -> None:
    image = cxr_dir / "RG1_DX_J2KR.dcm"
    header = pydicom.dcmread(image, stop_before_pixels=True)
    accession = header.AccessionNumber
    assert len(accession) == 56
    with running_orthanc(tmp_path / "pacs") as pacs:
        assert pacs.store([image]) == {str(image): "Success"}
        config = write_config(
            tmp_path,
            queue={"local_worker": True},
            model=DEMO_MODEL,
            destinations=[{"type": "dicom", "name": "pacs", "ae_title": Orthanc.AE_TITLE,
                           "host": "127.0.0.1", "port": Orthanc.DICOM_PORT}],
        )
        with NodeProcess(config, netns=pacs.ns.name) as node:
            assert storescu(node.port, [image], netns=pacs.ns.name) == {str(image): "Success"}
            assert wait_for(lambda: node.states() == ["sent"], 180), node.log()[-4000:]
            said = node.events("report.inherited_nonconformant")
        assert [(e["attribute"], e["vr"], e["reason"]) for e in said] == [
            ("AccessionNumber", "SH", "56 characters, at most 16")]
        assert accession not in node.log()

        # the PACS has one study under that accession: the images' own, now with the draft in it
        [image_id] = pacs.find(header.SOPInstanceUID)
        images_study = pacs.get(f"/instances/{image_id}/study")
        assert pacs.post("/tools/find", {"Level": "Study",
                                         "Query": {"AccessionNumber": accession}}) == [
            images_study["ID"]]
        [draft_series] = [s for s in map(pacs.get, (f"/series/{i}" for i in images_study["Series"]))
                          if s["MainDicomTags"].get("Modality") == "SR"]
        [sr_id] = draft_series["Instances"]
        tags = pacs.tags(sr_id)
        assert tags["AccessionNumber"] == accession
        assert (tags["StudyInstanceUID"], tags["PatientID"]) == (
            header.StudyInstanceUID, header.PatientID)
        assert pacs.get(f"/instances/{sr_id}/study")["ID"] == images_study["ID"]
        stored = tmp_path / "from-pacs.dcm"
        stored.write_bytes(pacs.file(sr_id))

    sr = pydicom.dcmread(stored)
    source = pydicom.dcmread(image, stop_before_pixels=True)
    assert sr.get_item("AccessionNumber").value == source.get_item("AccessionNumber").value
    assert_valid_sr(stored, image, nonconformant_source=["AccessionNumber"])

    # the admin sees which inherited value is not conformant, never the value
    [reported] = [r for r in read_trail(node.state_dir / "audit.jsonl").records
                  if r["event"] == "study.reported"]
    assert reported["nonconformant_source_values"] == [NOTE]
    status = subprocess.run([sys.executable, "-m", "cxr_node", "status", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    [row] = [line for line in status.splitlines() if reported["study_key"] in line]
    assert " sent " in row and row.endswith(f"copied unchanged: {NOTE}")
    assert accession not in status
