"""The receiver under attack: what a peer that reaches the DICOM port can try, against the real node.

Hostile values are put on the wire byte by byte (tests/rawdicom.py): pynetdicom and pydicom would
refuse to send most of them, an attacker's client does not.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import jpeg_ls
import numpy as np
import pydicom
import pytest
from dicomgen import make_cxr, write_study
from nodeproc import (
    NodeProcess,
    free_port,
    memory_mib,
    parse_storescu,
    storescu,
    storescu_in_background,
    wait_for,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from pydicom import config
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from rawdicom import (
    CR_IMAGE_STORAGE,
    P_DATA_TF,
    RawAssociation,
    associate_rq,
    dataset_bytes,
    pdu,
)

from cxr_node.audit import read_trail

# Slow: real node processes. The tests write invalid values on purpose; pydicom warns about each.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    with NodeProcess(write_config(tmp_path_factory.mktemp("attacks"))) as proc:
        yield proc


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def audit(node: NodeProcess) -> list[dict]:
    return read_trail(node.state_dir / "audit.jsonl").records


def store_raw(node: NodeProcess, sop_instance: str, dataset: bytes,
              sop_class: str = CR_IMAGE_STORAGE):
    with RawAssociation(node.port) as assoc:
        assert assoc.associate()
        answer = assoc.c_store(sop_class, sop_instance, dataset)
        assoc.release()
    return answer


# --- paths never come from peer data ----------------------------------------------------------


def hostile_uids(outside: Path) -> dict[str, str]:
    return {
        "relative": "../../../x/pwn",
        "absolute": str(outside / "abs" / "pwn"),
        "nul": "1.2.3\x00/../../../nul/pwn",
        "10kB": "1." * 5000 + "1",
        "leading-zero": "1.2.03",
        "empty-component": "1.2..3",
    }


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("kind", list(hostile_uids(Path("/"))))
def test_hostile_uids_are_refused_and_nothing_is_written_outside_the_spool(
    node: NodeProcess, attribute: str, kind: str
):
    outside = node.state_dir.parent
    value = hostile_uids(outside)[kind]
    before, seen = files_under(outside), len(audit(node))
    stored = len(node.db("SELECT 1 FROM instances"))
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    with config.disable_value_validation():
        setattr(ds, attribute, value)
        answer = store_raw(node, ds.SOPInstanceUID, dataset_bytes(ds))

    assert answer.status == 0xC000, answer
    assert "UID" in answer.comment and "\x00" not in answer.comment, answer
    new = files_under(outside) - before
    assert all(node.state_dir in p.parents or p.suffix == ".log" for p in new), sorted(new)
    assert not [p for p in new if node.state_dir / "spool" in p.parents], sorted(new)
    assert not (outside / "x").exists() and not (outside / "abs").exists()
    assert len(node.db("SELECT 1 FROM instances")) == stored
    [record] = [r for r in audit(node)[seen:] if r["event"].startswith("instance.")]
    assert record["event"] == "instance.quarantined" and record["status"] == "0xC000", record
    assert "UID" in record["reason"]
    assert len(json.dumps(record)) < 2000  # a 10 kB value is not copied into the trail
    assert "\x00" not in json.dumps(record, ensure_ascii=False)


def test_hostile_uids_in_the_request_alone_are_refused_or_aborted_and_nothing_escapes(
    node: NodeProcess
):
    """The dataset is fine, the C-STORE request names hostile UIDs: the SOP Instance UID gets a
    0xC000; a SOP Class UID that is no storage class is aborted by pynetdicom before any handler
    runs. Neither leaves a file outside the spool, and the node keeps serving."""
    outside = node.state_dir.parent
    before = files_under(outside)
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    answer = store_raw(node, "../../../x/pwn\x00", dataset_bytes(ds))
    assert answer.status == 0xC000 and "request SOP Instance UID" in answer.comment, answer
    aborted = store_raw(node, ds.SOPInstanceUID, dataset_bytes(ds),
                        sop_class="1.2.840.10008.5.1.4.1.1.1\x00/../../x")
    assert aborted.aborted, aborted
    assert all(node.state_dir in p.parents or p.suffix == ".log"
               for p in files_under(outside) - before)
    assert not (outside / "x").exists()
    assert store_raw(node, ds.SOPInstanceUID, dataset_bytes(ds)).status == 0x0000


# --- every PDU length is bounded before memory is committed -----------------------------------

MEMORY_BOUND_MIB = 64
"""What a receiver process may grow by while it is attacked (its buffers are at most 256 KiB)."""
ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])  # A-ABORT: provider, invalid PDU parameter


def closed_after(sock: socket.socket, expect: bytes = b"", timeout: float = 10) -> bool:
    """Whether the node sent ``expect`` (nothing by default) and then closed the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(64):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return data == expect


def records(node: NodeProcess, event: str, **fields: object) -> list[dict]:
    return [r for r in audit(node) if r["event"] == event
            and all(r.get(k) == v for k, v in fields.items())]


def test_a_4_gib_pdu_announcement_allocates_nothing(tmp_path: Path):
    """Six bytes announce a PDU of 4 GiB; the node aborts at once instead of committing memory."""
    with NodeProcess(write_config(tmp_path, node={"receivers": 1})) as node:
        [receiver] = node.receiver_pids()
        before = memory_mib(receiver)
        attackers = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
        for n, sock in enumerate(attackers):
            sock.sendall(struct.pack(">BBL", (0x01, 0x04)[n % 2], 0, 0xFFFFFFFF))
        def grew() -> float:
            return memory_mib(receiver, "VmHWM") - before

        wait_for(lambda: grew() >= MEMORY_BOUND_MIB, 2)  # give an allocation time to show
        assert grew() < MEMORY_BOUND_MIB, f"receiver grew by {grew():.0f} MiB"
        assert all(closed_after(sock, ABORT) for sock in attackers)
        [refused] = records(node, "association.refused", cause="pdu_too_large")
        assert "announces 4294967295 bytes" in refused["reason"]
        for sock in attackers:
            sock.close()


def test_a_held_oversized_association_request_delays_no_one(tmp_path: Path):
    """An A-ASSOCIATE-RQ announcing 0xFFFFFFFF bytes, its connection held open: a modality on
    the same receiver process is accepted within a second."""
    with NodeProcess(write_config(tmp_path, node={"receivers": 1})) as node:
        held = socket.create_connection(("127.0.0.1", node.port))
        held.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF) + b"\x00\x01\x00\x00")
        time.sleep(0.2)
        started = time.monotonic()
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
        waited = time.monotonic() - started
        assert assoc.is_established and waited < 1.0, waited
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert closed_after(held, ABORT)


def test_a_p_data_pdu_over_the_announced_maximum_aborts_its_association(tmp_path: Path):
    with NodeProcess(write_config(tmp_path, node={"max_pdu_bytes": 16384})) as node:
        with RawAssociation(node.port) as raw:
            assert raw.associate() and raw.peer_max_pdu == 16384
            raw.send(pdu(P_DATA_TF, bytes(16384 + 7)))  # PDV header allowed, one byte more not
            assert raw.read_pdu() == (ABORT[0], ABORT[6:])
            assert raw.read_pdu() is None
        assert wait_for(lambda: records(node, "association.aborted", cause="pdu_too_large"), 5)
        ds = make_cxr(generate_uid(), rows=64, columns=64)  # 8 kB: several PDUs of 16 kB
        assert store_raw(node, ds.SOPInstanceUID, dataset_bytes(ds)).status == 0x0000


# --- admission that cannot be starved ---------------------------------------------------------


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def open_ones(socks: list[socket.socket]) -> list[socket.socket]:
    """The connections the node has not closed (after a moment to close them)."""
    time.sleep(1)
    alive = []
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1):
                alive.append(sock)
        except BlockingIOError:
            alive.append(sock)
        except OSError:
            pass
    return alive


def echo(port: int) -> bool:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


LOOPBACK = [{"ae_title": "*", "network": "127.0.0.0/8"}]


def test_idle_connections_from_one_address_do_not_lock_out_a_modality(tmp_path: Path):
    config = write_config(tmp_path, accept=LOOPBACK, node={"acse_timeout_seconds": 30})
    with NodeProcess(config) as node:
        idle = [connect_from("127.0.0.2", node.port) for _ in range(200)]
        started = time.monotonic()
        assert echo(node.port)
        assert time.monotonic() - started < 2
        assert len(open_ones(idle)) == 8  # node.max_pending_per_source; the rest closed at once
        refused = records(node, "association.refused", cause="pending_per_source")
        assert all(r["peer"] == "127.0.0.2" and "node.max_pending_per_source" in r["reason"]
                   for r in refused)
        # 192 refusals: a line per receiver process and 10 s, each with the count it stands for
        assert 1 <= len(refused) <= 4 and len(node.events("association.refused")) <= 4
        for sock in idle:
            sock.close()


def test_pending_connections_are_limited_in_total(tmp_path: Path):
    config = write_config(tmp_path, accept=LOOPBACK, node={  # one accept queue: taken in order
        "receivers": 1, "acse_timeout_seconds": 30, "max_pending_connections": 4,
        "max_pending_per_source": 2})
    with NodeProcess(config) as node:
        idle = [connect_from(f"127.0.0.{2 + n // 2}", node.port) for n in range(4)]
        late = connect_from("127.0.0.9", node.port)
        assert closed_after(late)
        [refused] = records(node, "association.refused", cause="pending_limit")
        assert refused["peer"] == "127.0.0.9"
        assert len(open_ones(idle)) == 4
        for sock in idle:
            sock.close()
        assert wait_for(lambda: echo(node.port), 10)  # their places are given back


def test_an_address_no_accept_rule_names_is_closed_before_anything_is_read(tmp_path: Path):
    with NodeProcess(write_config(tmp_path)) as node:  # accept: 127.0.0.1/32 only
        with RawAssociation(node.port, source="127.0.0.2") as raw:
            assert not raw.associate() and raw.rejection is None  # no A-ASSOCIATE-RJ: closed
        [refused] = records(node, "association.refused", cause="unknown_network")
        assert refused["peer"] == "127.0.0.2"
        assert echo(node.port)


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    port = node.config["http"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_every_refusal_is_logged_audited_and_counted(tmp_path: Path):
    config = write_config(
        tmp_path, http={"enabled": True, "port": free_port()},
        accept=[{"ae_title": "MODALITY1", "network": "127.0.0.1/32"},
                {"ae_title": "OTHER", "network": "127.0.0.3/32"}],
        node={"receivers": 1, "max_associations": 1, "max_pending_per_source": 2,
              "acse_timeout_seconds": 30})
    with NodeProcess(config) as node:
        with RawAssociation(node.port, source="127.0.0.2") as raw:  # unknown network
            assert not raw.associate()
        held = [connect_from("127.0.0.3", node.port) for _ in range(2)]  # pending, then one more
        assert closed_after(connect_from("127.0.0.3", node.port))
        for sock in held:
            sock.close()
        with RawAssociation(node.port) as raw:  # the called AE title is not ours
            assert not raw.associate(associate_rq(called="SOMEONE")) and raw.rejection
        with RawAssociation(node.port) as raw:  # no rule for this calling AE title
            assert not raw.associate(associate_rq(calling="INTRUDER")) and raw.rejection
        with RawAssociation(node.port) as raw:  # an association request of 4 GiB
            raw.send(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
            assert closed_after(raw.sock, ABORT)
        with RawAssociation(node.port) as first:
            assert first.associate()
            with RawAssociation(node.port) as second:  # node busy
                assert not second.associate() and second.rejection == (2, 3, 2)
            first.release()
        causes = {"unknown_network": "association.refused",
                  "pending_per_source": "association.refused",
                  "pdu_too_large": "association.refused",
                  "wrong_called_ae_title": "association.rejected",
                  "unknown_calling_ae_or_address": "association.rejected",
                  "node_busy": "association.rejected"}
        for cause, event in causes.items():
            assert wait_for(lambda: metric(node, "cxr_node_associations_rejected_total",
                                           reason=cause) == 1, 5), cause
            [record] = records(node, event, cause=cause)
            assert any(e.get("reason") == record["reason"] for e in node.events(event)), cause
        [busy] = records(node, "association.rejected", cause="node_busy")
        assert busy["diagnostic"] == 2 and "node.max_associations" in busy["reason"]


# --- decompression bombs ----------------------------------------------------------------------


def deflate_bomb(inflated: int = 1 << 30) -> bytes:
    """A Deflated Explicit VR Little Endian data set of ~1 MB whose Pixel Data inflates to
    ``inflated`` bytes (a 16384 x 32768 16-bit image of zeros)."""
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    del ds.PixelData
    ds.Rows, ds.Columns = 16384, inflated // 16384 // 2
    header = dataset_bytes(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, inflated)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    chunks = [deflate.compress(header)]
    chunks += [deflate.compress(zeros) for _ in range(inflated >> 20)]
    return b"".join([*chunks, deflate.flush()])


def test_a_deflate_bomb_is_not_negotiated_and_never_inflated(tmp_path: Path):
    with NodeProcess(write_config(tmp_path, node={"receivers": 1})) as node:
        [receiver] = node.receiver_pids()
        before = memory_mib(receiver)
        bomb = deflate_bomb()
        assert len(bomb) < 2 << 20
        with RawAssociation(node.port) as raw:
            assert raw.associate(associate_rq(contexts=[
                (CR_IMAGE_STORAGE, [DeflatedExplicitVRLittleEndian]),
                (CR_IMAGE_STORAGE, [ExplicitVRLittleEndian])]))
            assert raw.accepted == {3: ExplicitVRLittleEndian}  # deflate refused, the other taken
            # a peer that sends it anyway on the context it was refused is aborted
            answer = raw.c_store(CR_IMAGE_STORAGE, generate_uid(), bomb, context_id=1)
            assert answer.aborted
        grew = memory_mib(receiver, "VmHWM") - before
        assert grew < MEMORY_BOUND_MIB, f"receiver grew by {grew:.0f} MiB"
        assert not node.db("SELECT 1 FROM instances")
        assert echo(node.port)


def test_a_sender_that_prefers_deflate_falls_back_to_an_uncompressed_syntax(
        tmp_path: Path, node: NodeProcess):
    source = tmp_path / "deflated.dcm"
    ds = make_cxr(generate_uid(), rows=64, columns=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(source, enforce_file_format=True)
    assert storescu(node.port, [source]) == {str(source): "Success"}  # storescu -xd
    [row] = node.db("SELECT transfer_syntax FROM instances WHERE sop_instance_uid = ?",
                    ds.SOPInstanceUID)
    assert row["transfer_syntax"] != DeflatedExplicitVRLittleEndian


def jpeg_ls_bomb(path: Path, size: int = 16384) -> Path:
    """A JPEG-LS image of ``size`` x ``size`` pixels (mostly black, a noisy corner): some tens
    of kB that decode to 256 MB."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[:200, :200] = np.random.default_rng(0).integers(0, 256, (200, 200), np.uint8)
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg_ls.encode(pixels).tobytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_image_declaring_more_pixels_than_the_limits_is_refused_at_c_store(
        tmp_path: Path, node: NodeProcess):
    bomb = jpeg_ls_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 100_000
    uid = pydicom.dcmread(bomb, stop_before_pixels=True).SOPInstanceUID
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(CR_IMAGE_STORAGE, JPEGLSLossless)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE")
    status = assoc.send_c_store(bomb)
    assoc.release()
    assert status.Status == 0xC000, status
    assert "limits.max_image_pixels" in status.ErrorComment
    assert not node.db("SELECT 1 FROM instances WHERE sop_instance_uid = ?", uid)
    [record] = records(node, "instance.quarantined", sop_instance_uid=uid)
    assert "16384x16384" in record["reason"]


# --- a disk that fills up while receiving -----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB file system of its own (tmpfs), so that the test can fill it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave_mb: int) -> Path:
    """A file that takes all the free space on ``disk`` but ``leave_mb``."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    ballast.write_bytes(bytes(max(st.f_bavail * st.f_frsize - (leave_mb << 20), 0)))
    return ballast


def test_a_disk_filling_up_mid_transfer_gets_0xA700_and_never_an_abort(
        tmp_path: Path, small_disk: Path):
    source = tmp_path / "send"
    source.mkdir()
    images = write_study(source, ["PA"] * 6, rows=2048, columns=2048)  # 8 MB each
    config = write_config(tmp_path, node={"state_dir": str(small_disk / "state"),
                                          "min_free_disk_mb": 1, "receivers": 1})
    with NodeProcess(config) as node:
        ballast = fill(small_disk, leave_mb=20)
        # one association that goes on after a refusal, as modalities do; the disk is full
        # after two images
        answers = storescu(node.port, images, extra=["--no-halt"])
        assert set(answers.values()) == {"Success", "Refused: OutOfResources"}, answers
        assert not node.events("association.ended") or all(
            e["how"] == "released" for e in node.events("association.ended"))
        refused = [f for f, answer in answers.items() if answer != "Success"]
        assert len(refused) >= 3
        assert len(node.events("instance.refused")) <= 2  # one line per 10 s, with a count
        assert "Traceback" not in node.log()
        assert not list((small_disk / "state" / "spool" / ".incoming").iterdir())
        ballast.unlink()  # space comes back: the modality's retries go through
        assert set(storescu(node.port, map(Path, refused)).values()) == {"Success"}
        assert len(node.db("SELECT 1 FROM instances")) == len(images)


# --- start-up reconciliation ------------------------------------------------------------------


def test_spool_files_without_an_index_row_are_settled_before_the_port_opens(tmp_path: Path):
    """What a SIGKILL between a file's rename and its row's commit leaves: the copy is removed
    when the instance is indexed already, indexed when it is not, quarantined when unusable."""
    source = tmp_path / "send"
    source.mkdir()
    first, second, third = write_study(source, ["PA", "LL", "AP"], rows=32, columns=32)
    config = write_config(tmp_path)
    with NodeProcess(config) as node:
        assert set(storescu(node.port, [first, second]).values()) == {"Success"}
    [kept] = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?",
                     pydicom.dcmread(first).SOPInstanceUID)
    folder = Path(kept["path"]).parent
    copy, orphan, junk = (folder / f"{name}.dcm" for name in ("c0ffee", "0a0a0a", "bad000"))
    copy.write_bytes(Path(kept["path"]).read_bytes())  # the re-send was indexed first
    orphan.write_bytes(third.read_bytes())  # its modality has not re-sent it yet
    junk.write_bytes(b"\x00" * 200)
    with NodeProcess(config) as node:
        assert not copy.exists() and not junk.exists()
        [row] = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?",
                        pydicom.dcmread(third).SOPInstanceUID)
        assert Path(row["path"]) == orphan
        events = {r["event"] for r in audit(node)}
        assert {"instance.reconciled_removed", "instance.reconciled_indexed",
                "instance.reconciled_quarantined"} <= events
        assert node.events("spool.reconciled")
        assert set(storescu(node.port, [first, second, third]).values()) == {"Success"}
        assert len(node.db("SELECT 1 FROM instances")) == 3
        assert len(list((node.state_dir / "spool").glob("*/*.dcm"))) == 3


def test_sigkill_during_parallel_ingest_leaves_one_copy_of_each_instance(tmp_path: Path):
    source = tmp_path / "send"
    source.mkdir()
    files = [f for i in range(30) for f in write_study(source, ["PA", "LL"], seed=i,
                                                        rows=512, columns=512)]
    config = write_config(tmp_path, node={"max_associations": 8})
    node = NodeProcess(config).start()
    try:
        senders = [storescu_in_background(node.port, files[i::4]) for i in range(4)]
        assert wait_for(lambda: len(node.events("instance.stored")) >= 12, 60)
        node.kill()
        acknowledged = [f for sender in senders
                        for f, status in parse_storescu(sender.communicate(timeout=60)[0]).items()
                        if status == "Success"]
    finally:
        node.kill()
    assert acknowledged
    with NodeProcess(config) as node:
        spool = node.state_dir / "spool"
        rows = node.db("SELECT sop_instance_uid, path FROM instances")
        assert len({r["sop_instance_uid"] for r in rows}) == len(rows)  # one row per instance
        assert {Path(r["path"]) for r in rows} == set(spool.glob("*/*.dcm"))  # one file per row
        indexed = {r["sop_instance_uid"] for r in rows}
        assert {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                for f in map(Path, acknowledged)} <= indexed
        assert set(storescu(node.port, files).values()) == {"Success"}  # the modalities retry
        assert len(node.db("SELECT 1 FROM instances")) == len(files)
        assert len(list(spool.glob("*/*.dcm"))) == len(files)
