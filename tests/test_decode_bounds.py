"""Bounded decoding: decompression bombs, decoders that crash or hang, and what reasons may say.

The bombs are made here in a few milliseconds: a small synthetic chest encoded with pydicom's own
JPEG-LS or JPEG 2000 encoder, whose codestream frame header (SOF55, SIZ) is then edited to declare
16384 x 16384 pixels while the DICOM header keeps saying 64 x 64. A decoder trusts the codestream:
before these limits, decoding one such 10 kB file took the node's process past 1.6 GB.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicomgen import dataset_bytes, make_cxr, write_study
from nodeproc import NodeProcess, storescu, wait_for, write_config
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from cxr_node.config import Config, LimitsConfig
from cxr_node.decoder import DecoderProcess, DecoderUnavailable
from cxr_node.imaging import Candidate, ImagingError, View, prepare, select_images
from cxr_node.queue import DraftQueue
from cxr_node.store import InstanceRecord, Store, StudyState

MAX_SIDE = 256
BOMB_SIDE = 16384
CODECS = {"jpeg-ls": JPEGLSLossless, "jpeg-2000": JPEG2000Lossless}


def encoded(path: Path, syntax: UID, rows: int = 64, columns: int = 64, **attributes: Any) -> Path:
    """A synthetic CR chest compressed with pydicom's encoder for ``syntax``."""
    ds = make_cxr(generate_uid(), rows=rows, columns=columns, **attributes)
    ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def declaring(path: Path, rows: int, columns: int) -> Path:
    """Edit the codestream's own frame header (JPEG-LS SOF55, JPEG 2000 SIZ) to say rows x columns.

    For JPEG 2000 the single tile is made as large as the image, as an encoder would.
    """
    ds = pydicom.dcmread(path)
    stream = bytearray(b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))))
    if ds.file_meta.TransferSyntaxUID == JPEGLSLossless:
        struct.pack_into(">HH", stream, stream.index(b"\xff\xf7") + 5, rows, columns)
    else:
        assert stream[:4] == b"\xff\x4f\xff\x51", "SOC, then SIZ"
        struct.pack_into(">II", stream, 8, columns, rows)  # Xsiz, Ysiz
        struct.pack_into(">II", stream, 24, columns, rows)  # XTsiz, YTsiz
    ds.PixelData = encapsulate([bytes(stream)])
    ds.save_as(path)
    return path


def bomb(directory: Path, codec: str, name: str = "bomb.dcm", **attributes: Any) -> Path:
    """64 x 64 in the DICOM header, 16384 x 16384 in the codestream."""
    return declaring(encoded(directory / name, CODECS[codec], **attributes), BOMB_SIDE, BOMB_SIDE)


def heavy(path: Path, **attributes: Any) -> Path:
    """An honest JPEG-LS image of 6000 x 8000 (under every header limit) in a file of 250 kB.

    Decoding and rendering it takes about 600 MB: more than a 256 MB decoder limit.
    """
    ds = make_cxr(generate_uid(), **attributes)
    pixels = np.zeros((6000, 8000), dtype=np.uint16)
    pixels[::50] = 4095
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.compress(JPEGLSLossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def deflate_bomb(path: Path, inflated_mb: int) -> Path:
    """A Deflated Explicit VR Little Endian file of a few MB whose dataset inflates to far more:
    pydicom inflates the whole dataset as it reads the file, before any header can be checked."""
    ds = make_cxr(generate_uid())
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    deflated = dataset_bytes(path)
    meta = path.read_bytes()[: -len(deflated)]
    stream = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mb << 20
    parts = [meta, stream.compress(zlib.decompress(deflated, -zlib.MAX_WBITS)),
             stream.compress(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", size))]
    parts += [stream.compress(bytes(1 << 20)) for _ in range(inflated_mb)]
    path.write_bytes(b"".join([*parts, stream.flush()]))
    return path


@pytest.fixture(scope="module")
def decoder() -> Iterator[DecoderProcess]:
    process = DecoderProcess(LimitsConfig(decode_memory_mb=512, decode_timeout_seconds=30))
    yield process
    process.close()


@pytest.fixture
def decoder_with() -> Iterator[Callable[..., DecoderProcess]]:
    """Decoder processes with the given limits, closed after the test."""
    started: list[DecoderProcess] = []

    def start(**limits: Any) -> DecoderProcess:
        started.append(DecoderProcess(LimitsConfig(**limits)))
        return started[-1]

    yield start
    for process in started:
        process.close()


@pytest.fixture
def small_chest(tmp_path: Path) -> Path:
    return encoded(tmp_path / "small.dcm", JPEGLSLossless)


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# --- what the header and the codestream declare, checked before any decoder runs ----------------


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_codestream_larger_than_its_header_is_refused_without_decoding(
    codec: str, tmp_path: Path
) -> None:
    path = bomb(tmp_path, codec)
    assert path.stat().st_size < 20_000
    before = vm_hwm_mb()
    with pytest.raises(ImagingError) as caught:
        prepare(path, MAX_SIDE)
    assert str(caught.value) == (
        f"the compressed codestream declares {BOMB_SIDE} x {BOMB_SIDE} x 1, the DICOM header "
        "64 x 64 x 1 (rows x columns x samples); not decoded"
    )
    assert vm_hwm_mb() - before < 64, "the codestream's size was allocated"


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_an_honest_codestream_still_decodes(codec: str, tmp_path: Path) -> None:
    pixels = prepare(encoded(tmp_path / "honest.dcm", CODECS[codec], rows=96, columns=80), 512)
    assert pixels.shape == (96, 80)


def test_a_header_over_max_image_pixels_is_refused_before_any_decoder_runs(tmp_path: Path) -> None:
    """Pixel data no decoder could read: had one run, the reason would be its error."""
    ds = make_cxr(generate_uid())
    ds.Rows = ds.Columns = 30000
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    path = tmp_path / "huge-header.dcm"
    ds.save_as(path)
    with pytest.raises(ImagingError) as caught:
        prepare(path, MAX_SIDE)
    assert str(caught.value) == (
        "the header declares 30000 x 30000 pixels x 1 frame(s) x 1 sample(s) = 900,000,000, "
        "more than limits.max_image_pixels (50,000,000); not decoded"
    )


def test_a_header_over_max_decoded_mb_is_refused(small_chest: Path, tmp_path: Path) -> None:
    path = encoded(tmp_path / "two-mb.dcm", JPEGLSLossless, rows=1024, columns=1024)
    limits = LimitsConfig(max_decoded_mb=1)
    with pytest.raises(ImagingError, match=r"would decode to 2\.0 MB \(16 bits allocated\), more "
                                           r"than limits\.max_decoded_mb \(1\); not decoded"):
        prepare(path, MAX_SIDE, limits)
    assert prepare(small_chest, MAX_SIDE, limits).shape == (64, 64)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("Rows", b"\x00\x00", "Rows in the header is out of range (1 to 2147483647)"),
        ("NumberOfFrames", b"999999999999",
         "NumberOfFrames in the header is out of range (1 to 2147483647)"),
        ("NumberOfFrames", b"PATIENT^NAME", "NumberOfFrames in the header is not a whole number"),
    ],
)
def test_hostile_header_counts_are_refused_without_quoting_them(
    tmp_path: Path, keyword: str, value: bytes, reason: str
) -> None:
    """Written as bytes: pydicom itself would refuse to set such values."""
    ds = make_cxr(generate_uid(), NumberOfFrames="424242424242", Rows=0x4242)
    path = tmp_path / "hostile.dcm"
    ds.save_as(path)
    placeholder = b"424242424242" if keyword == "NumberOfFrames" else b"\x42\x42"
    data = path.read_bytes()
    assert data.count(placeholder) == 1
    path.write_bytes(data.replace(placeholder, value))
    with pytest.raises(ImagingError) as caught:
        prepare(path, MAX_SIDE)
    assert str(caught.value) == reason


# --- the decoder process: what a crash, a hang or a memory bomb costs -----------------------------


@pytest.mark.parametrize(
    ("function", "args", "reason"),
    [
        (os.abort, (), r"the decoder crashed \(signal 6, SIGABRT\)"),
        (ctypes.string_at, (0,), r"the decoder crashed \(signal 11, SIGSEGV\)"),
        (bytearray, (2**40,), r"decoding needed more than 512 MB \(limits\.decode_memory_mb\)"),
    ],
    ids=["abort", "segfault", "memory-error"],
)
def test_a_decoder_failure_is_an_imaging_error_and_the_next_image_decodes(
    decoder: DecoderProcess, small_chest: Path, function: Any, args: tuple[Any, ...], reason: str
) -> None:
    """Any callable runs through the same child process as `prepare`: here, ones that fail."""
    decoder.prepare(small_chest, MAX_SIDE)
    first = decoder.pid
    with pytest.raises(ImagingError, match=reason):
        decoder.run(function, *args)
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)
    assert decoder.pid != first, "a process that saw a failure gets no further image"


def test_a_decoder_that_hangs_is_given_up_after_the_timeout(
    decoder_with: Callable[..., DecoderProcess], small_chest: Path
) -> None:
    decoder = decoder_with(decode_timeout_seconds=0.5)
    with pytest.raises(ImagingError, match=r"^decoding took longer than 0\.5 s "
                                           r"\(limits\.decode_timeout_seconds\)$"):
        decoder.run(time.sleep, 60)
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)


def test_a_killed_decoder_fails_only_the_image_it_held(
    decoder: DecoderProcess, small_chest: Path
) -> None:
    """What the kernel's out-of-memory killer does: SIGKILL, no chance to answer."""
    decoder.prepare(small_chest, MAX_SIDE)
    idle = decoder.pid
    assert idle is not None
    os.kill(idle, signal.SIGKILL)  # between two images: the next one never notices
    wait_for(lambda: decoder.pid is None, 5)
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)

    busy = decoder.pid
    assert busy is not None
    threading.Timer(0.3, os.kill, (busy, signal.SIGKILL)).start()
    with pytest.raises(ImagingError, match=r"killed \(signal 9, SIGKILL\), most likely by the "
                                           r"system for lack of memory"):
        decoder.run(time.sleep, 20)
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)


NODE_WITH_A_BUSY_DECODER = """
import sys, threading, time
from cxr_node.config import LimitsConfig
from cxr_node.decoder import DecoderProcess
decoder = DecoderProcess(LimitsConfig(decode_timeout_seconds=60))
decoder.run(len, "")
threading.Thread(target=decoder.run, args=(time.sleep, 50), daemon=True).start()
print(decoder.pid, file=sys.stderr, flush=True)
time.sleep(60)
"""


def test_the_decoder_dies_with_the_node_even_in_the_middle_of_an_image() -> None:
    """The node SIGKILLed while its decoder works: nothing is left running (PR_SET_PDEATHSIG)."""
    node = subprocess.Popen([sys.executable, "-c", NODE_WITH_A_BUSY_DECODER],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert node.stderr is not None
        child = int(node.stderr.readline())
        time.sleep(0.5)  # the decoder is in the middle of its call
    finally:
        node.kill()
        node.wait()

    def gone() -> bool:
        try:
            return "\nState:\tZ" in Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return True

    assert wait_for(gone, 10), "the decoder outlived the node"


def test_a_decoder_that_cannot_start_is_the_nodes_problem_not_the_images(
    monkeypatch: pytest.MonkeyPatch, small_chest: Path
) -> None:
    """No image is failed for it: the caller (the queue stage) tries again later."""
    decoder = DecoderProcess(LimitsConfig())
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a child that exits at once
    with pytest.raises(DecoderUnavailable, match=r"did not start \(exited with code 1\)"):
        decoder.prepare(small_chest, MAX_SIDE)
    monkeypatch.undo()
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)


def test_an_honest_image_too_large_to_decode_within_the_memory_limit(
    decoder_with: Callable[..., DecoderProcess], tmp_path: Path
) -> None:
    """Every header check passes; only the decoder's address-space limit stops it."""
    path = heavy(tmp_path / "heavy.dcm")
    before = vm_hwm_mb()
    with pytest.raises(ImagingError, match=r"^decoding needed more than 256 MB "
                                           r"\(limits\.decode_memory_mb\)$"):
        decoder_with(decode_memory_mb=256).prepare(path, MAX_SIDE)
    assert vm_hwm_mb() - before < 64, "the image was decoded in this process"


def test_a_deflate_bomb_is_inflated_only_within_the_decoder_memory_limit(
    decoder: DecoderProcess, small_chest: Path, tmp_path: Path
) -> None:
    """Stored before the receiver refused such files, or accepted by it: 3 MB that inflate to
    600 MB when read."""
    path = deflate_bomb(tmp_path / "deflated.dcm", inflated_mb=600)
    assert path.stat().st_size < 4 << 20
    with pytest.raises(ImagingError, match=r"^decoding needed more than 512 MB"):
        decoder.prepare(path, MAX_SIDE)
    assert decoder.prepare(small_chest, MAX_SIDE).shape == (64, 64)


def test_the_decoder_gives_the_same_pixels_as_decoding_here(
    decoder: DecoderProcess, cxr_dir: Path
) -> None:
    for name in ("RG1_J2KI.dcm", "RG1_JLSN.dcm", "RG1_DX_J2KR.dcm", "CR-MONO1-10-chest.dcm"):
        np.testing.assert_array_equal(
            decoder.prepare(cxr_dir / name, MAX_SIDE), prepare(cxr_dir / name, MAX_SIDE)
        )


@pytest.mark.slow
def test_the_largest_image_the_header_limits_admit_decodes_within_the_default_memory(
    decoder_with: Callable[..., DecoderProcess], tmp_path: Path
) -> None:
    """The default limits agree with each other: 50 million 16-bit pixels, rescaled, through a VOI
    LUT (the costliest rendering) decode under the default decode_memory_mb."""
    limits = LimitsConfig()
    side = int(limits.max_image_pixels**0.5)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 16])
    lut.add_new("LUTData", "US", list(range(4095, -1, -1)))
    ds = make_cxr(generate_uid(), RescaleSlope=1.5, RescaleIntercept=-1024, VOILUTSequence=[lut])
    ds.Rows = ds.Columns = side
    ds.PixelData = np.tile(np.linspace(0, 4095, side).astype(np.uint16), (side, 1)).tobytes()
    path = tmp_path / "largest.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    assert decoder_with().prepare(path, MAX_SIDE).shape == (MAX_SIDE, MAX_SIDE)


# --- what reasons and log events name ------------------------------------------------------------


def test_reasons_and_imaging_events_name_no_file_and_no_uid(
    tmp_path: Path, decoder: DecoderProcess
) -> None:
    uids = [f"1.2.826.0.1.3680043.10.9999.{n}" for n in range(1, 5)]
    gone = tmp_path / f"{uids[0]}.dcm"
    not_dicom = tmp_path / f"{uids[1]}.dcm"
    not_dicom.write_bytes(b"not DICOM\n" * 40)
    lying = bomb(tmp_path, "jpeg-ls", name=f"{uids[2]}.dcm")
    # zero window width: the decoder process logs imaging.window_unusable for this image
    usable = encoded(tmp_path / f"{uids[3]}.dcm", JPEGLSLossless, WindowCenter=100, WindowWidth=0)
    candidates = [
        Candidate(uids[0], gone, View.PA, 4, instance_id=11),
        Candidate(uids[1], not_dicom, View.PA, 3, instance_id=12),
        Candidate(uids[2], lying, View.AP, 2, instance_id=13),
        Candidate(uids[3], usable, View.UNKNOWN, 1, instance_id=14),
    ]
    with capture_logs(processors=[merge_contextvars]) as events:
        selection = select_images(candidates, MAX_SIDE, decode=decoder.prepare)
    assert [image.sop_instance_uid for image in selection.images] == [uids[3]]
    reasons = dict(selection.dropped)
    assert reasons[uids[0]] == (
        "PA image could not be prepared: not readable as DICOM: No such file or directory"
    )
    with pytest.raises(ImagingError) as caught:
        select_images(candidates[:3], MAX_SIDE, decode=decoder.prepare)
    texts = [*reasons.values(), str(caught.value), *map(str, events)]
    for secret in [*uids, str(tmp_path)]:
        assert not any(secret in text for text in texts), secret
    imaging = [e for e in events if e["event"].startswith("imaging.")]
    assert imaging and all(e.get("instance") in (11, 12, 13, 14) for e in imaging), imaging
    [window] = [e for e in events if e["event"] == "imaging.window_unusable"]
    assert window["instance"] == 14, "an event of the decoder process names its image"


def test_a_study_reason_lists_a_bounded_number_of_failures(tmp_path: Path) -> None:
    not_dicom = tmp_path / "not-dicom.dcm"
    not_dicom.write_bytes(b"not DICOM\n" * 40)
    candidates = [Candidate(f"1.2.3.{n}", not_dicom, View.PA, n) for n in range(1, 101)]
    with pytest.raises(ImagingError) as caught:
        select_images(candidates, MAX_SIDE)
    assert str(caught.value).endswith("; 95 more")
    assert len(str(caught.value)) < 1000


# --- the queue: a failure fails its study, never a loop ------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def stable_study(store: Store, folder: Path, side: int) -> str:
    folder.mkdir(exist_ok=True)
    [path] = write_study(folder, ["PA"], rows=side, columns=side)
    ds = pydicom.dcmread(path)
    store.record_instance(InstanceRecord(
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID,
        str(ds.file_meta.TransferSyntaxUID), "CR", "CHEST", "PA", "PA", 1, str(path),
        path.stat().st_size, "MODALITY", "127.0.0.1"), same_content=lambda _: False)
    study = store.study(ds.StudyInstanceUID)
    assert study is not None and store.move(study, StudyState.STABLE, "test")
    return str(ds.StudyInstanceUID)


def test_images_prepared_again_after_a_restart_are_bounded_and_fail_only_their_job(
    tmp_path: Path,
) -> None:
    """The pixels of a queued job live in memory; a job submitted after a restart is prepared
    again from the files, under the limits the node now runs with."""

    def config(**limits: Any) -> Config:
        return Config.model_validate({
            "node": {"state_dir": str(tmp_path / "state")},
            "queue": {"local_worker": False},
            "limits": limits,
        })

    store = Store(config().database_path)
    large, small = (stable_study(store, tmp_path / "images", side) for side in (128, 64))
    clock = Clock()
    before = DraftQueue(config(), store, clock=clock)
    before.step()
    assert {store.study(uid).state for uid in (large, small)} == {StudyState.QUEUED}

    restarted = config(max_image_pixels=10_000)  # an admin lowered the limit, then restarted
    after = DraftQueue(restarted, store, clock=clock)
    clock.now += restarted.queue.effective_result_timeout + 1  # no result: submitted again
    for _ in range(5):
        after.step()
        clock.now += 600  # past any retry delay
    failed = store.study(large)
    assert failed is not None and failed.state == StudyState.FAILED
    assert "more than limits.max_image_pixels (10,000); not decoded" in (failed.reason or "")
    assert store.study(small).state == StudyState.QUEUED, "the other study's job is sent"


# --- the node: a bomb fails its study, the node stays small, a restart does not decode it again ---


@pytest.mark.slow
def test_bombs_fail_their_studies_the_node_stays_small_and_a_restart_leaves_them(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    sop = {"lying": generate_uid(), "heavy": generate_uid()}
    lying = bomb(images, "jpeg-ls", name="lying.dcm", sop_uid=sop["lying"])
    too_heavy = heavy(images / "heavy.dcm", sop_uid=sop["heavy"])
    config = write_config(tmp_path, limits={"decode_memory_mb": 256})
    with NodeProcess(config) as node:
        assert node.proc is not None
        ready = vm_hwm_mb(node.proc.pid)
        assert set(storescu(node.port, [lying, too_heavy]).values()) == {"Success"}
        assert wait_for(lambda: node.states() == ["failed", "failed"], 120), node.log()[-3000:]
        grown = vm_hwm_mb(node.proc.pid) - ready
        reasons = sorted(r["reason"] for r in node.db("SELECT reason FROM studies"))
        first_log = node.log()
    assert grown < 150, f"the node's own process grew by {grown:.0f} MB"
    assert reasons == [
        "no usable image: no frontal image could be prepared: PA #1: decoding needed more than "
        "256 MB (limits.decode_memory_mb)",
        "no usable image: no frontal image could be prepared: PA #1: the compressed codestream "
        f"declares {BOMB_SIDE} x {BOMB_SIDE} x 1, the DICOM header 64 x 64 x 1 (rows x columns x "
        "samples); not decoded",
    ]
    imaging_lines = [line for line in first_log.splitlines() if '"imaging.' in line]
    assert imaging_lines
    for secret in [*sop.values(), str(node.state_dir)]:
        assert not any(secret in line for line in imaging_lines), secret

    with NodeProcess(config) as again:
        time.sleep(3)  # settle time and many polls: long enough to see a decode if one came
        assert again.states() == ["failed", "failed"]
        assert again.db("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 0
        assert "imaging.decoder_started" not in again.log()
