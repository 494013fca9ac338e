"""Ingest end to end: dcmtk's storescu (a real modality) against the real node process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomgen import dataset_bytes, make_cxr, same_dataset, write_study
from nodeproc import (
    NodeProcess,
    free_port,
    parse_storescu,
    run_storescu,
    storescu,
    storescu_in_background,
    wait_for,
    write_config,
)
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

pytestmark = pytest.mark.slow

SUCCESS = "Success"


@pytest.fixture()
def node(tmp_path: Path):
    with NodeProcess(write_config(tmp_path)) as proc:
        yield proc


def test_real_chest_xrays_are_stored_byte_identical_and_indexed(node: NodeProcess, cxr_dir: Path):
    files = sorted(cxr_dir.glob("*.dcm"))
    results = storescu(node.port, files)
    assert results == {str(f): SUCCESS for f in files}, results
    for f in files:
        source = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        rows = node.db("SELECT * FROM instances WHERE sop_instance_uid = ? ORDER BY id",
                       source.SOPInstanceUID)
        assert rows, f"{f.name} not indexed"
        stored = Path(rows[-1]["path"])
        assert stored.stat().st_mode & 0o777 == 0o600
        assert any(same_dataset(Path(r["path"]), f) for r in rows), f.name
        assert rows[-1]["study_uid"] == source.StudyInstanceUID
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
        assert rows[-1]["calling_ae"] == "MODALITY1"
    # RG1_DX_J2KR and its broken copy share one SOP Instance UID, not content: both kept, flagged
    same_uid = node.db("SELECT conflict FROM instances WHERE sop_instance_uid = ? ORDER BY id",
                       pydicom.dcmread(cxr_dir / "RG1_DX_J2KR.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert [r["conflict"] for r in same_uid] == [0, 1]
    assert node.events("instance.conflict")
    # a second send of the same files stores nothing new
    before = len(node.db("SELECT id FROM instances"))
    assert set(storescu(node.port, files[:3]).values()) == {SUCCESS}
    assert len(node.db("SELECT id FROM instances")) == before
    assert len(node.events("instance.duplicate")) == 3
    # routing: chest studies stable, the two leg studies and the dog thorax skipped with reasons
    states = {r["state"] for r in node.db("SELECT state FROM studies")}
    wait_for(lambda: not node.db("SELECT 1 FROM studies WHERE state = 'receiving'"), 10)
    skipped = {r["reason"] for r in node.db("SELECT reason FROM studies WHERE state = 'skipped'")}
    assert any("LEG" in r for r in skipped) and any("EXTREMITY" in r for r in skipped), (states, skipped)
    assert "PatientName" not in node.log() and "Anonymized" not in node.log()


def test_stored_bytes_are_exactly_the_bytes_sent(node: NodeProcess, cxr_dir: Path):
    """A sender that streams its file unchanged: the spool holds those very bytes."""
    files = [f for f in sorted(cxr_dir.glob("*.dcm")) if f.read_bytes()[128:132] == b"DICM"]
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for f in files:
            meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
            assert assoc.send_c_store(f).Status == 0, f.name
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rows = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?", uid)
        copies = [dataset_bytes(Path(r["path"])) for r in rows]  # the DX pair shares a UID
        assert copies.count(dataset_bytes(f)) == 1, f.name


def test_four_modalities_at_once_store_every_instance_exactly_once(tmp_path: Path):
    source = tmp_path / "send"
    source.mkdir()
    studies = [write_study(source, ["PA", "LL", "PA", "AP", "LL"], seed=i, rows=32, columns=32)
               for i in range(40)]
    files = [f for study in studies for f in study]
    assert len(files) == 200
    chunks = [files[i::4] for i in range(4)]
    # every sender also re-sends part of its neighbour's files: duplicates arrive concurrently
    sends = [chunks[i] + chunks[(i + 1) % 4][:10] for i in range(4)]
    with NodeProcess(write_config(tmp_path, node={"max_associations": 8})) as node:
        outputs: list[str] = []
        threads = [threading.Thread(target=lambda s=s: outputs.append(
            run_storescu(["-aet", "MODALITY1", "-aec", "CXR_NODE", "127.0.0.1", str(node.port),
                          *map(str, s)]))) for s in sends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        responses = {}
        for out in outputs:
            responses.update(parse_storescu(out))
        assert set(responses) == {str(f) for f in files}
        assert set(responses.values()) == {SUCCESS}
        rows = node.db("SELECT sop_instance_uid FROM instances")
        assert len(rows) == 200 and len({r[0] for r in rows}) == 200
        assert len(list((node.state_dir / "spool").rglob("*.dcm"))) == 200
        assert wait_for(lambda: len(node.db("SELECT 1 FROM studies WHERE state != 'receiving'")) == 40, 20)


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path, request):
    source = tmp_path / "send"
    source.mkdir()
    files = [f for i in range(12) for f in write_study(
        source, ["PA", "LL"], seed=i, rows=1024, columns=1024)]
    config = write_config(tmp_path, study={"settle_seconds": 1})
    node = NodeProcess(config).start()
    request.addfinalizer(node.kill)
    sender = storescu_in_background(node.port, files)
    assert wait_for(lambda: len(node.events("instance.stored")) >= 4, 60)
    node.kill()
    out, _ = sender.communicate(timeout=60)
    acknowledged = [f for f, status in parse_storescu(out).items() if status == SUCCESS]
    assert 3 <= len(acknowledged) < len(files), out[-2000:]

    with NodeProcess(config) as node:
        for f in acknowledged:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            rows = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?", uid)
            assert len(rows) == 1, f
            assert same_dataset(Path(rows[0]["path"]), f), f
        spool = node.state_dir / "spool"
        assert not [*spool.rglob(".tmp-*"), *(spool / ".incoming").iterdir()], "partial files left"
        # the modality retries the rest; every study completes normally
        assert set(storescu(node.port, files).values()) == {SUCCESS}
        assert len(node.db("SELECT 1 FROM instances")) == len(files)
        assert wait_for(lambda: len(node.db("SELECT 1 FROM studies WHERE state != 'receiving'")) == 12, 20)


def test_restart_rebuilds_pending_study_timers(tmp_path: Path, cxr_dir: Path):
    config = write_config(tmp_path, study={"settle_seconds": 3})
    with NodeProcess(config) as node:
        assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {SUCCESS}
    state = node.db("SELECT state FROM studies")
    assert [r["state"] for r in state] == ["receiving"]
    with NodeProcess(config) as node:
        assert wait_for(lambda: node.db("SELECT state FROM studies")[0]["state"] != "receiving", 10)


def test_unknown_ae_or_address_is_rejected_with_a_logged_reason(tmp_path: Path, cxr_dir: Path):
    config = write_config(tmp_path, accept=[{"ae_title": "MODALITY1", "network": "127.0.0.1/32"},
                                            {"ae_title": "REMOTE", "network": "10.1.2.0/24"}])
    with NodeProcess(config) as node:
        f = cxr_dir / "CR-MONO1-10-chest.dcm"
        for aet, aec in (("INTRUDER", "CXR_NODE"), ("REMOTE", "CXR_NODE"), ("MODALITY1", "WRONG")):
            out = run_storescu(["-aet", aet, "-aec", aec, "127.0.0.1", str(node.port), str(f)])
            assert "Association Rejected" in out, out
        reasons = [e["reason"] for e in node.events("association.rejected")]
        assert any("'INTRUDER'" in r for r in reasons)
        assert any("'REMOTE' from 127.0.0.1" in r for r in reasons)
        assert any("called AE title 'WRONG'" in r for r in reasons)
        assert set(storescu(node.port, [f]).values()) == {SUCCESS}
        assert len(node.db("SELECT 1 FROM instances")) == 1


def test_bare_connects_and_garbage_do_not_lock_out_modalities(tmp_path: Path, cxr_dir: Path):
    config = write_config(tmp_path, node={"max_associations": 2, "receivers": 1,
                                          "acse_timeout_seconds": 30})
    with NodeProcess(config) as node:
        for i in range(10):  # port scanners and load-balancer health checks
            with socket.create_connection(("127.0.0.1", node.port)):
                pass
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00" + b"\xff" * 300, b"\x00" * 10):
            with socket.create_connection(("127.0.0.1", node.port)) as s:
                s.sendall(junk)
                s.settimeout(5)
                try:
                    s.recv(100)
                except OSError:
                    pass
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(1)]
        started = time.monotonic()
        assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {SUCCESS}
        assert time.monotonic() - started < 10  # not waiting out the 30 s ACSE timeout
        for s in silent:
            s.close()


def _send(port: int, ds: pydicom.Dataset | Path) -> pydicom.Dataset:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_corrupt_datasets_get_a_failure_status_and_land_in_quarantine(tmp_path: Path, cxr_dir: Path):
    with NodeProcess(write_config(tmp_path)) as node:
        short = make_cxr(generate_uid(), rows=256, columns=256)
        short.PixelData = short.PixelData[: len(short.PixelData) // 2]
        status = _send(node.port, short)
        assert status.Status == 0xC000, status
        assert "Pixel Data has" in status.ErrorComment

        no_study = make_cxr(generate_uid())
        del no_study.StudyInstanceUID
        assert _send(node.port, no_study).Status == 0xC000

        # a JPEG 2000 file cut short in transfer: sent raw, as a broken modality would
        cut = tmp_path / "cut.dcm"
        data = (cxr_dir / "RG1_J2KI.dcm").read_bytes()
        cut.write_bytes(data[: len(data) - 5000])
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(ComputedRadiographyImageStorage,
                                     "1.2.840.10008.1.2.4.91")
            assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
            status = assoc.send_c_store(cut)
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assert status.Status == 0xC000 and "truncated" in status.ErrorComment

        quarantined = sorted((node.state_dir / "quarantine").glob("*.json"))
        assert len(quarantined) == 3
        assert all(q.with_suffix(".dcm").exists() for q in quarantined)
        assert not node.db("SELECT 1 FROM instances")
        # the node keeps serving
        assert set(storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"]).values()) == {SUCCESS}


def test_full_disk_answers_out_of_resources(tmp_path: Path, cxr_dir: Path):
    with NodeProcess(write_config(tmp_path, node={"min_free_disk_mb": 10**9})) as node:
        result = storescu(node.port, [cxr_dir / "CR-MONO1-10-chest.dcm"])
        assert list(result.values()) == ["Refused: OutOfResources"], result
        assert not node.db("SELECT 1 FROM instances")
        assert node.events("instance.refused")


def test_verification(node: NodeProcess):
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_port_in_use_is_a_clear_start_error(tmp_path: Path):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        done = subprocess.run(
            [sys.executable, "-m", "cxr_node", "serve", "--config",
             str(write_config(tmp_path, node={"port": port}))],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1" in done.stderr


def test_copies_compare_by_dataset_bytes_not_file_meta(tmp_path: Path):
    """A re-send is recognised by its dataset bytes, whatever File Meta each copy was given."""
    from cxr_node.part10 import same_dataset as same_copy

    ds = make_cxr(generate_uid(), rows=16, columns=16)
    first, second, other = tmp_path / "a.dcm", tmp_path / "b.dcm", tmp_path / "c.dcm"
    ds.save_as(first, enforce_file_format=True)
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"  # a longer File Meta group
    ds.save_as(second, enforce_file_format=True)
    assert first.stat().st_size != second.stat().st_size
    assert same_copy(first, second)
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # one pixel differs
    other.write_bytes(data)
    assert not same_copy(first, other)
    assert not same_copy(first, tmp_path / "missing.dcm")


def test_association_limit_is_node_wide_not_per_receiver_process(tmp_path: Path):
    """The kernel spreads connections over the receiver processes by hash: all four modalities
    get in, whichever processes they land on, and the fifth is told to retry later."""
    config = write_config(tmp_path, node={"max_associations": 4, "receivers": 4})

    def associate() -> Any:
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")

    with NodeProcess(config) as node:
        held = [associate() for _ in range(4)]
        assert all(a.is_established for a in held)
        extra = associate()
        assert extra.is_rejected
        rejection = extra.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert any("node busy" in e["reason"] for e in node.events("association.rejected"))
        held.pop().release()
        assert wait_for(lambda: (a := associate()).is_established and a.release() is None, 10)
        for a in held:
            a.release()


def test_partial_files_of_cut_transfers_are_removed_while_running(tmp_path: Path):
    """A transfer aborted mid-dataset leaves a partial file; the node does not wait for a restart
    to clear it, but never touches one that may still be written."""
    config = write_config(tmp_path, node={"network_timeout_seconds": 30})
    with NodeProcess(config) as node:
        incoming = node.state_dir / "spool" / ".incoming"
        abandoned, recent = incoming / "tmpabandoned.dcm", incoming / "tmprecent.dcm"
        for path in (abandoned, recent):
            path.write_bytes(b"\x00" * 1000)
        old = time.time() - 600
        os.utime(abandoned, (old, old))
        source = tmp_path / "send"
        source.mkdir()
        image = write_study(source, ["PA"], rows=32, columns=32)
        assert set(storescu(node.port, image).values()) == {SUCCESS}
        assert wait_for(lambda: not abandoned.exists(), 10)
        assert recent.exists()
        assert node.events("spool.partial_files_removed")


def test_a_study_with_both_views_is_taken_on_at_once_not_at_the_next_poll(tmp_path: Path):
    """The receiver processes wake the assemble stage: with stages polling only every 5 s, three
    two-view studies sent 1.7 s apart are each found stable within a second of their last image
    (polls alone could serve at most one of them that fast)."""
    config = write_config(tmp_path, study={"settle_seconds": 60},
                          queue={"poll_interval_seconds": 5})
    source = tmp_path / "send"
    source.mkdir()
    studies = [write_study(source, ["PA", "LL"], seed=i, rows=32, columns=32) for i in range(3)]
    with NodeProcess(config) as node:
        for study in studies:
            assert set(storescu(node.port, study).values()) == {SUCCESS}
            time.sleep(1.7)
        delays = node.db(
            """SELECT t.at - s.last_received_at AS delay FROM transitions t
               JOIN studies s USING (study_uid) WHERE t.state = 'stable'""")
        assert len(delays) == 3
        assert all(0 <= r["delay"] < 1.0 for r in delays), [r["delay"] for r in delays]
