"""`cxr-node send`, `echo` and `config check --connect` against real peers: the node (also with
DICOM TLS) and Orthanc (also one that refuses JPEG 2000, as some PACS are set up)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from dicomgen import dataset_bytes, make_cxr, same_dataset
from nodeproc import NodeProcess, free_port, write_config
from pacs import NetworkNamespace, running_orthanc
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from samples import wg04
from test_tls import make_identity

from cxr_node.destinations.dicom import describe_certificate

# One sample per transfer syntax (tests/samples.py says what each is).
SAMPLES = {
    "RG1_UNCR.dcm": "as stored, Explicit VR Little Endian",
    # its Pixel Data has an odd length: DICOM wants it padded, which a copy does
    "highdicom_dx_image.dcm": "Explicit VR Little Endian, a copy with its odd-length value padded",
    "RG3_MONO2_JPLL.dcm": "as stored, JPEG Lossless, Non-Hierarchical, First-Order Prediction "
                          "(Process 14 [Selection Value 1])",
    "RG1_JLSN.dcm": "as stored, JPEG-LS Lossy (Near-Lossless) Image Compression",
    "RG3_J2KR.dcm": "as stored, JPEG 2000 Image Compression (Lossless Only)",
    "RG1_J2KI.dcm": "as stored, JPEG 2000 Image Compression",
    "CR-MONO1-10-chest.dcm": "as stored without File Meta, Implicit VR Little Endian",
}


def cxr_node(*args: str | Path, netns: NetworkNamespace | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cxr_node", *map(str, args)]
    return subprocess.run(netns.command(argv) if netns else argv, capture_output=True, text=True,
                          timeout=timeout)


def lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """{file: what send said of it}."""
    out = {}
    for line in done.stdout.splitlines():
        name, sep, said = line.partition(": ")
        if sep and Path(name).suffix:
            out[Path(name).name] = said
    return out


def samples(cxr_dir: Path) -> list[Path]:
    return [wg04(name) if name == "RG1_UNCR.dcm" else cxr_dir / name for name in SAMPLES]


def syntax_of(path: Path) -> str | None:
    meta = pydicom.dcmread(path, force=True, stop_before_pixels=True).file_meta
    return meta.TransferSyntaxUID if "TransferSyntaxUID" in meta else None


def uid_of(path: Path) -> str:
    return pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID


# --- without a peer ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The value length .* exceeds")  # written so on purpose
def test_files_that_are_not_sendable_are_named_and_nothing_connects(tmp_path: Path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"MSH|^~\\&|not a DICOM file\r" * 20)
    bad_uid = tmp_path / "bad-uid.dcm"
    make_cxr(generate_uid(), rows=8, columns=8, sop_uid="1.2.03." + "9" * 70).save_as(
        bad_uid, enforce_file_format=True)
    done = cxr_node("send", "--port", free_port(), junk, bad_uid, tmp_path / "absent.dcm")
    said = lines(done)
    assert done.returncode == 1, done
    assert said["junk.dcm"].startswith("NOT stored: "), said
    assert said["bad-uid.dcm"] == "NOT stored: SOPInstanceUID is not a valid UID", said
    assert said["absent.dcm"].startswith("NOT stored: cannot read it: "), said
    assert done.stdout.splitlines()[-1] == "0 of 3 file(s) stored; 3 NOT stored"


def test_bad_options_name_the_option(tmp_path: Path):
    done = cxr_node("echo", "--aet", "FAR\\TOO\\LONG\\FOR\\AN\\AE", "--port", "70000")
    assert done.returncode == 2
    assert "--aet" in done.stderr and "--port" in done.stderr and "Traceback" not in done.stderr


def test_certificate_description_says_subject_issuer_and_days_left():
    cert = {"subject": ((("commonName", "pacs"),), (("organizationName", "Hospital"),)),
            "issuer": ((("commonName", "hospital-ca"),),), "notAfter": "Jan  2 00:00:00 2030 GMT"}
    now = time.mktime((2029, 12, 2, 0, 0, 0, 0, 0, 0)) - time.timezone
    assert describe_certificate(cert, now) == (
        "TLS peer certificate: subject commonName=pacs, organizationName=Hospital; issuer "
        "commonName=hospital-ca; expires 2030-01-02 00:00 UTC (31 days left)")
    assert "EXPIRED 30 days ago" in describe_certificate(cert, now + 61 * 86400)


# --- to the node -------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_sample_reaches_the_node_as_stored(tmp_path: Path, cxr_dir: Path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "README.txt").write_text("not DICOM\n")
    shutil.copy(cxr_dir / "RG1_J2KI.dcm", folder / "frontal.dcm")
    with NodeProcess(write_config(tmp_path)) as node:
        done = cxr_node("send", "--port", node.port, *samples(cxr_dir))
        said = lines(done)
        assert done.returncode == 0, (done.stdout, done.stderr)
        for path, how in zip(samples(cxr_dir), SAMPLES.values(), strict=True):
            assert said[path.name] == f"stored (0x0000 Success; {how})", said
            rows = node.db("SELECT path FROM instances WHERE sop_instance_uid = ?", uid_of(path))
            assert len(rows) == 1, path.name
            stored = Path(rows[0]["path"])
            assert same_dataset(stored, path), path.name
            if how.startswith("as stored, "):  # byte for byte, as the file holds it
                assert dataset_bytes(stored) == dataset_bytes(path), path.name
            assert syntax_of(stored) == (syntax_of(path) or ImplicitVRLittleEndian)
        assert done.stdout.splitlines()[-1] == "7 of 7 file(s) stored"
        # a folder: its DICOM files are sent, anything else is skipped and said so
        again = cxr_node("send", "--port", node.port, folder)
        assert again.returncode == 0, again.stdout
        assert lines(again)["README.txt"].startswith("skipped: ")
        assert again.stdout.splitlines()[-1] == "1 of 1 file(s) stored; 1 skipped (not DICOM)"
        assert len(node.events("instance.duplicate")) == 1  # frontal.dcm is RG1_J2KI again


@pytest.mark.slow
def test_refusals_are_a_clear_line_and_exit_1(tmp_path: Path, cxr_dir: Path):
    image = cxr_dir / "CR-MONO1-10-chest.dcm"
    only_modality1 = [{"ae_title": "MODALITY1", "network": "127.0.0.1/32"}]
    config = write_config(tmp_path, accept=only_modality1, node={"min_free_disk_mb": 10**9})
    with NodeProcess(config) as node:
        unknown = cxr_node("send", "--port", node.port, image)  # calls as CXR_SEND
        assert unknown.returncode == 1
        assert lines(unknown)[image.name] == (
            f"NOT stored: association rejected by CXR_NODE@127.0.0.1:{node.port}: Calling AE "
            "title not recognised (Service User), permanently"), unknown.stdout
        wrong_called = cxr_node("send", "--port", node.port, "--calling-aet", "MODALITY1",
                                "--aet", "SOMEONE_ELSE", image)
        assert wrong_called.returncode == 1
        assert "Called AE title not recognised" in lines(wrong_called)[image.name]
        full = cxr_node("send", "--port", node.port, "--calling-aet", "MODALITY1", image)
        assert full.returncode == 1
        assert lines(full)[image.name] == (
            "NOT stored (0xA700 Refused: Out of Resources; temporary: send it again later)")
        assert full.stdout.splitlines()[-1] == "0 of 1 file(s) stored; 1 NOT stored"


@pytest.mark.slow
def test_echo_says_whether_the_node_answers(tmp_path: Path):
    with NodeProcess(write_config(tmp_path)) as node:
        done = cxr_node("echo", "--port", node.port)
        assert done.returncode == 0, done.stdout
        assert done.stdout.startswith(f"C-ECHO CXR_NODE@127.0.0.1:{node.port}: 0x0000 Success in ")
        from_config = cxr_node("echo", "--config", node.config_path)
        assert from_config.returncode == 0, (from_config.stdout, from_config.stderr)
    closed = cxr_node("echo", "--port", node.port, "--timeout", "3")
    assert closed.returncode == 1
    assert "FAILED: no association with" in closed.stdout


# --- to other peers ----------------------------------------------------------------------------


@pytest.mark.slow
def test_every_sample_reaches_orthanc(tmp_path: Path, cxr_dir: Path):
    with running_orthanc(tmp_path / "orthanc") as pacs:
        done = cxr_node("send", "--port", pacs.DICOM_PORT, "--aet", pacs.AE_TITLE,
                        *samples(cxr_dir), netns=pacs.ns)
        assert done.returncode == 0, (done.stdout, done.stderr, pacs.log()[-2000:])
        assert all(said.startswith("stored (0x0000 Success") for said in lines(done).values())
        for path in samples(cxr_dir):
            [instance] = pacs.find(uid_of(path))
            kept = tmp_path / "kept.dcm"
            kept.write_bytes(pacs.file(instance))
            assert same_dataset(kept, path), path.name
            assert syntax_of(kept) == (syntax_of(path) or ImplicitVRLittleEndian), path.name


@pytest.mark.slow
def test_a_refused_syntax_is_sent_decompressed_or_named_when_it_cannot_be(
    tmp_path: Path, cxr_dir: Path
):
    lossy, broken = cxr_dir / "RG1_J2KI.dcm", cxr_dir / "RG1_DX_J2KR_broken.dcm"
    with running_orthanc(tmp_path / "orthanc", Jpeg2000TransferSyntaxAccepted=False) as pacs:
        done = cxr_node("send", "--port", pacs.DICOM_PORT, "--aet", pacs.AE_TITLE, lossy, broken,
                        netns=pacs.ns)
        said = lines(done)
        peer = f"ORTHANC@127.0.0.1:{pacs.DICOM_PORT}"
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert said[lossy.name] == (f"stored (0x0000 Success; as a decompressed copy: {peer} "
                                    "refused JPEG 2000 Image Compression)"), said
        assert said[broken.name].startswith(
            f"NOT stored: {peer} refused JPEG 2000 Image Compression (Lossless Only) and the file "
            "cannot be decompressed here: "), said
        [instance] = pacs.instances()
        copy = tmp_path / "copy.dcm"
        copy.write_bytes(pacs.file(instance))
    kept = pydicom.dcmread(copy)
    assert not kept.file_meta.TransferSyntaxUID.is_compressed
    assert kept.SOPInstanceUID == uid_of(lossy)
    assert (kept.pixel_array == pydicom.dcmread(lossy).pixel_array).all()


# --- config check --connect --------------------------------------------------------------------


@pytest.mark.slow
def test_config_check_connect_proves_each_connection(tmp_path: Path, cxr_dir: Path):
    ca = make_identity(tmp_path, "hospital-ca")
    pacs, node_identity = make_identity(tmp_path, "pacs", ca), make_identity(tmp_path, "node", ca)
    (tmp_path / "pacs").mkdir()
    tls_pacs = write_config(tmp_path / "pacs", node={"tls": {
        "certificate": str(pacs.cert), "private_key": str(pacs.key),
        "ca_certificates": str(ca.cert), "require_client_certificate": True}})
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with NodeProcess(tls_pacs) as peer:
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "node": {"state_dir": str(tmp_path / "state")},
            "destinations": [
                {"name": "pacs-tls", "ae_title": "CXR_NODE", "host": "127.0.0.1",
                 "port": peer.port, "timeout_seconds": 5,
                 "tls": {"certificate": str(node_identity.cert),
                         "private_key": str(node_identity.key), "ca_certificates": str(ca.cert)}},
                {"name": "pacs-down", "ae_title": "PACS", "host": "127.0.0.1",
                 "port": free_port(), "timeout_seconds": 3},
                {"name": "share", "folder": str(tmp_path / "out")},
                {"name": "blocked", "folder": str(blocked / "out")},
            ],
        }))
        done = cxr_node("config", "check", config, "--connect")
    out = done.stdout.splitlines()
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert out[0].startswith(f"ok      destination pacs-tls: C-ECHO CXR_NODE@127.0.0.1:{peer.port}"
                             ": 0x0000 Success in "), out
    assert "TLS peer certificate: subject commonName=pacs; issuer commonName=hospital-ca; " \
           "expires " in out[0] and "days left)" in out[0]
    assert out[1].startswith("FAILED  destination pacs-down: C-ECHO PACS@127.0.0.1:"), out
    assert out[2] == (f"ok      destination share: {tmp_path / 'out'} is writable (it did not "
                      "exist: made it 0700, as the node would)")
    assert out[3].startswith(f"FAILED  destination blocked: cannot write to {blocked / 'out'}")
    assert out[4] == "ok      broker: embedded queue folder writable"
    assert out[5] == "connections: 2 FAILED"
    assert list((tmp_path / "out").iterdir()) == []  # the probe file is gone again
