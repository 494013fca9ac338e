"""No patient identifiers where `logging.phi: false` promises none.

The real samples (and a study with unmistakable identifiers) go through a real node: stored,
drafted, sent, skipped, failed for a bad image or a bad header, quarantined. Then every line the
node and its worker logged, `cxr-node status`, `outbox` and `audit --study`, and everything the
HTTP endpoint serves are searched for every identifier the images carried: patient names, IDs,
birth dates, accession numbers and Study, Series and SOP Instance UIDs. The audit trail holds UIDs
on purpose (it is as private as the database); it is searched for the patient attributes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dicomgen import make_cxr
from nodeproc import DEMO_MODEL, NodeProcess, free_port, storescu, wait_for, write_config
from pydicom.uid import generate_uid

PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
           "ReferringPhysicianName", "StudyID")
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Values too common to mean anything when found (a PatientName of "Anonymized" is no identifier).
GENERIC = {"anonymized", "anonymous"}
FINISHED = {"sent", "skipped", "failed"}


def identifiers(path: Path, keywords: tuple[str, ...]) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    found = set()
    for keyword in keywords:
        value = ds.get(keyword)
        for item in value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]:
            text = str(item or "").strip()
            if len(text) >= 6 and text.lower() not in GENERIC:
                found.add(text)
                found.update(p for p in text.split("^") if len(p) >= 6)  # name components
    return found


def canary_study(directory: Path) -> list[Path]:
    """Two images of one study whose identifiers cannot be mistaken for anything else."""
    study = generate_uid()
    paths = []
    for view in ("PA", "LL"):
        ds = make_cxr(study, view=view, rows=256, columns=256, PatientName="Canaryname^Phiola",
                      PatientID="PID-CANARY-7731", AccessionNumber="ACC7731CANARY",
                      PatientBirthDate="19230405", ReferringPhysicianName="Refdoctor^Canary",
                      StudyID="STUDYCANARY")
        path = directory / f"canary-{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def http(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.read().decode()


def cli(config: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cxr_node", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.mark.slow
def test_no_identifier_reaches_a_log_a_status_or_a_page(tmp_path: Path, cxr_dir: Path,
                                                        demo_model: Path):
    images = sorted(cxr_dir.glob("*.dcm")) + canary_study(tmp_path)
    port = free_port()
    config = write_config(
        tmp_path, queue={"local_worker": True}, model={**DEMO_MODEL, "path": str(demo_model)},
        destinations=[{"name": "folder", "folder": str(tmp_path / "out")}],
        http={"enabled": True, "port": port}, logging={"level": "DEBUG", "phi": False})
    with NodeProcess(config) as node:
        results = storescu(node.port, images)
        assert "Success" in results.values(), results
        assert wait_for(lambda: node.states() and set(node.states()) <= FINISHED, 240), (
            node.states(), node.log()[-3000:])
        assert {"sent", "skipped", "failed"} <= set(node.states()), node.states()
        keys = [r["study_key"] for r in node.db("SELECT study_key FROM studies")]
        shown = {
            "log": node.log(),
            "status": cli(config, "status", "--limit", "100"),
            "outbox": cli(config, "outbox"),
            "audit --study": "".join(cli(config, "audit", "--study", key) for key in keys),
            "/api/status": http(port, "/api/status"),
            "/metrics": http(port, "/metrics"),
            "/healthz": http(port, "/healthz"),
        }
        trail = (node.state_dir / "audit.jsonl").read_text()
    patient = set().union(*(identifiers(p, PATIENT) for p in images))
    uids = set().union(*(identifiers(p, UIDS) for p in images))
    assert {"PID-CANARY-7731", "ACC7731CANARY", "Canaryname", "19230405"} <= patient
    for where, text in shown.items():
        leaked = sorted(v for v in patient | uids if v in text)
        assert not leaked, f"{where} shows {leaked}"
    assert not sorted(v for v in patient if v in trail), "the audit trail holds patient attributes"
    assert any(json.loads(line)["event"] == "study.failed" for line in trail.splitlines())
