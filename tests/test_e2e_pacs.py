"""The whole path against a real PACS: a modality sends a chest X-ray to Orthanc and to the node;
the node drafts it and the draft SR appears in Orthanc, in the image's study."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from nodeproc import DEMO_MODEL, NodeProcess, storescu, wait_for, write_config
from pacs import Orthanc, running_orthanc
from sr_validation import assert_valid_sr

pytestmark = pytest.mark.slow


def test_chest_xray_in_draft_sr_out_in_the_same_study_of_the_pacs(tmp_path: Path, cxr_dir: Path):
    image = cxr_dir / "RG1_J2KI.dcm"
    header = pydicom.dcmread(image, stop_before_pixels=True)
    with running_orthanc(tmp_path / "pacs") as pacs:
        assert pacs.store([image]) == {str(image): "Success"}
        config = write_config(
            tmp_path,
            study={"settle_seconds": 1},
            queue={"local_worker": True},
            model=DEMO_MODEL,
            destinations=[{"name": "pacs", "ae_title": Orthanc.AE_TITLE, "host": "127.0.0.1",
                           "port": Orthanc.DICOM_PORT}],
        )
        with NodeProcess(config, netns=pacs.ns.name) as node:
            result = storescu(node.port, [image], netns=pacs.ns.name)
            assert result == {str(image): "Success"}
            assert wait_for(lambda: node.states() == ["sent"], 180), node.log()[-4000:]
        [image_id] = pacs.find(header.SOPInstanceUID)
        study = pacs.get(f"/instances/{image_id}/study")
        series = [pacs.get(f"/series/{s}") for s in study["Series"]]
        [draft_series] = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
        assert draft_series["MainDicomTags"]["SeriesDescription"].startswith("DEMO MODEL")
        [sr_id] = draft_series["Instances"]
        tags = pacs.tags(sr_id)
        assert tags["StudyInstanceUID"] == header.StudyInstanceUID
        assert tags["AccessionNumber"] == header.AccessionNumber
        assert (tags["CompletionFlag"], tags["VerificationFlag"], tags["PreliminaryFlag"]) == (
            "PARTIAL", "UNVERIFIED", "PRELIMINARY")
        stored = tmp_path / "from-pacs.dcm"
        stored.write_bytes(pacs.file(sr_id))
    assert_valid_sr(stored, image)
    sr = pydicom.dcmread(io.BytesIO(stored.read_bytes()))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
