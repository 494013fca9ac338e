"""The receiver's checks, one at a time and in-process: UIDs, paths, header limits, the incoming
file's bounds, admission counts and the limits' configuration."""

from __future__ import annotations

import io
import multiprocessing
import os
import struct
from pathlib import Path

import pytest
from dicomgen import make_cxr
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxr_node import spool as spool_module
from cxr_node.admission import SHARED_INTS_PER_RECEIVER, ConnectionGate
from cxr_node.config import AcceptRule, ConfigError, LimitsConfig, NodeConfig, load_config
from cxr_node.durable import OutsideRoot, confined
from cxr_node.part10 import CANNOT_UNDERSTAND, Header, Limits, Rejected, shown_uid, uid_problem
from cxr_node.spool import DISK_CHECK_BYTES, IncomingFile
from cxr_node.throttle import Throttle

# The tests write invalid values on purpose; pydicom warns about each.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIMITS = Limits.of(LimitsConfig())


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.1", "0", "0.0", "1.20.300", "9" * 64])
def test_valid_uids(uid: str):
    assert uid_problem(uid) is None


@pytest.mark.parametrize(("uid", "problem"), [
    ("", "empty"), ("1." * 32 + "1", "over 64 characters (65)"),
    ("1.2.03", "leading zero"), ("01.2", "leading zero"), ("1..2", "empty component"),
    (".1", "empty component"), ("1.2.", "empty component"), ("../../x/pwn", "not only digits"),
    ("/abs/pwn", "not only digits"), ("1.2\x003", "not only digits"), ("1.2 ", "not only digits"),
    ("１.２", "not only digits"),  # digits, but not ASCII ones
    (["1.2", "1.3"], "not one text value"),
])
def test_invalid_uids_say_why(uid: object, problem: str):
    assert (uid_problem(uid) or "").startswith(problem)


def test_an_invalid_uid_is_shown_escaped_and_short():
    assert shown_uid("1.2.3") == "1.2.3"
    shown = shown_uid("1.2\x00/../" + "9" * 10_000)
    assert shown.startswith("(invalid, 10008 characters) 1.2\\x00/../") and len(shown) < 120


def test_confined_paths_stay_under_their_root(tmp_path: Path):
    root = tmp_path / "spool"
    (root / "study").mkdir(parents=True)
    assert confined(root / "study" / "a.dcm", root) == (root / "study" / "a.dcm").resolve()
    for escape in (root / "study" / "../../../x/pwn", root / "/etc/pwn", root / "a\x00b"):
        with pytest.raises(OutsideRoot):
            confined(escape, root)
    (root / "link").symlink_to(tmp_path)  # planted on the way
    with pytest.raises(OutsideRoot):
        confined(root / "link" / "pwn.dcm", root)
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    (tmp_path / "state").symlink_to(linked)  # a state directory that is itself a link is fine
    assert confined(tmp_path / "state" / "a.dcm", tmp_path / "state") == linked / "a.dcm"


def part10(tmp_path: Path, ds: Dataset, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    with pydicom_config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path


def refusal(path: Path, limits: Limits = LIMITS) -> Rejected:
    with pytest.raises(Rejected) as caught:
        Header.parse(path, limits)
    return caught.value


def test_images_beyond_the_limits_are_refused_from_the_header(tmp_path: Path):
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    assert Header.parse(part10(tmp_path, ds), LIMITS).size > 0
    small = Limits(max_dataset_bytes=1 << 30, max_image_pixels=255, max_decoded_bytes=1 << 30)
    assert "limits.max_image_pixels" in refusal(part10(tmp_path, ds), small).reason
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    tight = Limits(max_dataset_bytes=1 << 30, max_image_pixels=512, max_decoded_bytes=1000)
    assert "limits.max_decoded_mb" in refusal(part10(tmp_path, ds), tight).reason
    ds.NumberOfFrames = "-3"
    assert refusal(part10(tmp_path, ds)).reason == "invalid image dimensions"
    tiny = Limits(max_dataset_bytes=100, max_image_pixels=1 << 30, max_decoded_bytes=1 << 30)
    too_large = refusal(part10(tmp_path, ds), tiny)
    assert too_large.reason == "dataset larger than limits.max_dataset_mb" and not too_large.keep


def test_an_overlong_uid_is_refused_without_being_read(tmp_path: Path):
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    with pydicom_config.disable_value_validation():
        ds.StudyInstanceUID = "1." * 50_000 + "1"  # over the size pydicom is let read
    caught = refusal(part10(tmp_path, ds))
    assert caught.status == CANNOT_UNDERSTAND
    assert caught.reason == "invalid Study Instance UID: over 64 characters"


def test_routing_attributes_are_bounded(tmp_path: Path):
    ds = make_cxr(generate_uid(), rows=16, columns=16, BodyPartExamined="CHEST" * 1000,
                  ViewPosition="PA\x07")
    header = Header.parse(part10(tmp_path, ds), LIMITS)
    assert (header.modality, header.body_part, header.view_position) == ("CR", "", "")
    ds.InstanceNumber = "99999999999"
    assert Header.parse(part10(tmp_path, ds), LIMITS).instance_number is None


def test_a_header_of_countless_tiny_elements_is_refused_before_it_is_held(tmp_path: Path):
    """An undefined-length sequence pydicom would parse whole: 5 MB of empty items."""
    ds = make_cxr(generate_uid(), rows=16, columns=16)
    path = part10(tmp_path, ds)
    data = path.read_bytes()
    at = data.index(b"\xe0\x7f\x10\x00")  # Pixel Data: put the sequence before it
    items = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, 0) for _ in range(5 << 17))
    sequence = (struct.pack("<HH2sHL", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + items
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path.write_bytes(data[:at] + sequence + data[at:])
    caught = refusal(path)
    assert caught.reason == "header parses more than 4 MB" and not caught.keep


def incoming(tmp_path: Path, max_bytes: int = 1 << 30, min_free_mb: float = 0) -> IncomingFile:
    return IncomingFile(tmp_path / "in.dcm", max_bytes, min_free_mb)


def test_the_incoming_file_stops_at_the_size_limit_and_keeps_reading(tmp_path: Path):
    file = incoming(tmp_path, max_bytes=10)
    assert file.write(b"x" * 8) == 8 and file.refusal is None
    assert file.write(b"x" * 8) == 8  # taken off the wire, not written
    assert file.refusal and file.refusal.reason == "dataset larger than limits.max_dataset_mb"
    file.file.flush()
    file.close()
    assert (tmp_path / "in.dcm").stat().st_size == 0  # the space is given back


def test_the_incoming_file_stops_when_the_disk_runs_low(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    free = [100.0]
    monkeypatch.setattr(spool_module, "free_mb", lambda _path: free[0])
    file = incoming(tmp_path, min_free_mb=50)
    file.write(bytes(DISK_CHECK_BYTES - 1))
    free[0] = 10
    file.write(b"x")  # the check is due: writing stops
    assert file.refusal and file.refusal.status == 0xA700
    file.close()
    assert incoming(tmp_path / "..", min_free_mb=50).refusal  # and no new file is begun


def test_the_incoming_file_turns_enospc_into_a_refusal(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    file = incoming(tmp_path)
    monkeypatch.setattr(file, "_file", io.FileIO("/dev/full", "wb"))  # a disk with no room
    assert file.write(b"x" * 100) == 100
    assert file.refusal and file.refusal.reason == "free disk below node.min_free_disk_mb"
    assert file.refusal.status == 0xA700
    file.close()


def test_an_incoming_file_left_by_an_abort_closes_when_dropped(tmp_path: Path):
    fds = len(os.listdir("/proc/self/fd"))
    for n in range(50):
        IncomingFile(tmp_path / f"{n}.dcm", 1 << 30, 0).write(b"x")
    assert len(os.listdir("/proc/self/fd")) <= fds + 1


def test_throttle_reports_the_first_then_one_per_interval_with_the_count(
        monkeypatch: pytest.MonkeyPatch):
    now = [0.0]
    monkeypatch.setattr("cxr_node.throttle.time.monotonic", lambda: now[0])
    throttle = Throttle(interval=10, max_keys=2)
    assert [throttle.due("a") for _ in range(3)] == [1, 0, 0]
    assert throttle.due("b") == 1
    now[0] = 10
    assert throttle.due("a") == 3  # this one and the two held back
    throttle.due("c")  # three keys: the oldest is forgotten
    assert len(throttle._last) == 2


def gate(total: int, per_source: int, rules: list[AcceptRule] | None = None,
         receivers: int = 2) -> list[ConnectionGate]:
    counts = multiprocessing.get_context("spawn").Array("i", receivers * SHARED_INTS_PER_RECEIVER)
    rules = rules or [AcceptRule(ae_title="*", network="127.0.0.0/8")]
    return [ConnectionGate(rules, total, per_source, counts, index, b"k" * 16)
            for index in range(receivers)]


def test_pending_connections_are_counted_per_source_and_in_total_across_receivers():
    first, second = gate(total=3, per_source=2)
    held = [first.admit("127.0.0.2"), second.admit("127.0.0.2")]
    assert all(held)
    assert first.admit("127.0.0.2") is None  # the source's two, over both processes
    held.append(second.admit("127.0.0.3"))
    assert held[-1] and second.admit("127.0.0.4") is None  # three in total
    held[0].release()
    held[0].release()  # given back once, however often it is released
    assert first.admit("127.0.0.4") and first.admit("127.0.0.2") is None


def test_a_restarted_receiver_forgets_what_its_predecessor_held():
    counts = multiprocessing.get_context("spawn").Array("i", SHARED_INTS_PER_RECEIVER)
    rules = [AcceptRule(ae_title="*", network="*")]
    dead = ConnectionGate(rules, 1, 1, counts, 0, b"k" * 16)
    assert dead.admit("10.0.0.1")
    assert ConnectionGate(rules, 1, 1, counts, 0, b"k" * 16).admit("10.0.0.1")


def test_addresses_outside_every_rule_are_refused_at_the_door():
    [door] = gate(8, 8, [AcceptRule(ae_title="CR1", network="10.1.0.0/16")], receivers=1)
    assert door.admit("10.1.2.3") and door.admit("10.2.0.1") is None


def test_pdu_and_pending_limits_are_validated():
    assert NodeConfig().max_pdu_bytes == 128 << 10
    assert NodeConfig(max_pdu_bytes=0).max_pdu_bytes == 4 << 20  # 0 is the largest, not unbounded
    with pytest.raises(ValueError, match="0 or a PDU size from 4096 to 4194304"):
        NodeConfig(max_pdu_bytes=1024)
    with pytest.raises(ValueError):
        NodeConfig(max_pdu_bytes=5 << 20)
    with pytest.raises(ValueError, match="max_pending_per_source must be at most"):
        NodeConfig(max_pending_connections=4, max_pending_per_source=8)


def test_a_config_error_names_the_pdu_key(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("node:\n  max_pdu_bytes: 100\n")
    with pytest.raises(ConfigError, match=r"node.yaml:2: 'node.max_pdu_bytes' = 100"):
        load_config(path)
