"""DICOM TLS (PS3.15 B.1) both ways, with certificates made on the fly by the openssl command.

Receiver: the real node (its key read from a systemd credential directory), dcmtk's storescu and a
pynetdicom SCU as modalities. Sender: the node's C-STORE SCU to dcmtk's storescp with TLS, inside a
private network namespace (storescp cannot bind to loopback only).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dicomgen import make_cxr
from nodeproc import NodeProcess, accepts, parse_storescu, run_storescu, wait_for, write_config
from pacs import NetworkNamespace
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from cxr_node.audit import read_trail
from cxr_node.config import ConfigError, DestinationTLSConfig, TLSConfig, load_config
from cxr_node.destinations import Draft
from cxr_node.destinations.dicom import DicomDestination, DicomStore
from cxr_node.tls import TLS12_CIPHERS, client_context, server_context

STORESCP = "/usr/bin/storescp"
KEY_CREDENTIAL = "node-tls-key"


# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A certificate and its unencrypted private key, PEM files."""

    cert: Path
    key: Path


def openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(map(str, args[:2]))}:\n{done.stderr}"


def make_identity(directory: Path, name: str, ca: Identity | None = None,
                  san: str = "IP:127.0.0.1") -> Identity:
    """RSA 2048, one day; signed by ``ca`` (naming ``san``), else self-signed (a CA of its own)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    signing = ["-CA", ca.cert, "-CAkey", ca.key,
               "-addext", "basicConstraints=critical,CA:FALSE",
               "-addext", f"subjectAltName={san}",
               "-addext", "extendedKeyUsage=serverAuth,clientAuth"] if ca else []
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            *signing, "-keyout", key, "-out", cert)
    return Identity(cert, key)


@dataclass(frozen=True)
class PKI:
    """A hospital CA with a node, a modality and a PACS under it; a stranger outside it."""

    ca: Identity
    node: Identity
    modality: Identity
    pacs: Identity
    stranger: Identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = make_identity(d, "hospital-ca")
    return PKI(ca=ca, node=make_identity(d, "cxr-node", ca), modality=make_identity(d, "modality", ca),
               pacs=make_identity(d, "pacs", ca), stranger=make_identity(d, "stranger"))


def tls_config(identity: Identity, ca: Path | None = None, **kw: object) -> DestinationTLSConfig:
    return DestinationTLSConfig(certificate=identity.cert, private_key=identity.key,
                                ca_certificates=ca, **kw)


# --- contexts ----------------------------------------------------------------------------------


def test_contexts_follow_the_policy(pki: PKI):
    server = server_context(tls_config(pki.node, pki.ca.cert, require_client_certificate=True))
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(("GCM" in c or "CHACHA20" in c) and "DHE" in c for c in tls12), tls12
    optional = server_context(tls_config(pki.node, pki.ca.cert))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    assert server_context(tls_config(pki.node)).verify_mode == ssl.CERT_NONE
    client = client_context(tls_config(pki.node, pki.ca.cert, minimum_version="TLSv1.3"))
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3
    # only our CA: nothing from the system trust store
    assert [c["subject"] for c in client.get_ca_certs()] == [((("commonName", "hospital-ca"),),)]
    assert server_context(None) is None and client_context(None) is None
    assert TLS12_CIPHERS.startswith("ECDHE+AESGCM")


def test_file_problems_are_named(pki: PKI, tmp_path: Path):
    def problem(tls: TLSConfig) -> str:
        with pytest.raises(ConfigError) as err:
            server_context(tls)
        return str(err.value)

    missing = tmp_path / "missing.key"
    assert problem(TLSConfig(certificate=pki.node.cert, private_key=missing)) == (
        f"{missing}: cannot read the private key (No such file or directory)")
    assert "nor is there a systemd credential 'node-key'" in problem(TLSConfig(
        certificate=pki.node.cert, private_key=missing, private_key_credential="node-key"))
    assert "does not belong to the certificate" in problem(
        TLSConfig(certificate=pki.node.cert, private_key=pki.pacs.key))
    locked = tmp_path / "locked.key"
    openssl("pkey", "-in", pki.node.key, "-aes256", "-passout", "pass:secret", "-out", locked)
    assert "the private key is encrypted" in problem(
        TLSConfig(certificate=pki.node.cert, private_key=locked))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    assert f"{not_pem}: no PEM CA certificate" in problem(tls_config(pki.node, not_pem))
    with pytest.raises(ConfigError, match="has no ca_certificates"):
        client_context(tls_config(pki.node))


def test_key_is_read_from_the_systemd_credential_directory(pki: PKI, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / KEY_CREDENTIAL).write_bytes(pki.node.key.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    tls = TLSConfig(certificate=pki.node.cert, private_key=tmp_path / "root-only.key",
                    private_key_credential=KEY_CREDENTIAL)
    assert server_context(tls) is not None  # the configured path does not even exist


def test_node_with_a_missing_key_stops_with_a_message_naming_it(pki: PKI, tmp_path: Path):
    missing = tmp_path / "gone.key"
    config = write_config(tmp_path, node={"tls": {"certificate": str(pki.node.cert),
                                                  "private_key": str(missing)}})
    done = subprocess.run([sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]  # a configuration error: systemd won't loop
    assert "configuration error" in done.stderr
    assert f"{missing}: cannot read the private key" in done.stderr
    assert "cannot listen" not in done.stderr


# --- the receiver ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One receiver process (so a blocked accept loop would block everyone), client certs required,
    the key given as systemd gives a credential, not readable at its configured path."""
    d = tmp_path_factory.mktemp("tls-node")
    credentials = d / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / KEY_CREDENTIAL).write_bytes(pki.node.key.read_bytes())
    config = write_config(d, node={
        "receivers": 1, "acse_timeout_seconds": 5,
        "tls": {"certificate": str(pki.node.cert), "private_key": str(d / "root-only" / "node.key"),
                "private_key_credential": KEY_CREDENTIAL, "ca_certificates": str(pki.ca.cert),
                "require_client_certificate": True},
    })
    with NodeProcess(config, env={"CREDENTIALS_DIRECTORY": str(credentials)}) as node:
        yield node


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cxr.dcm"
    make_cxr(generate_uid(), rows=32, columns=32).save_as(path, enforce_file_format=True)
    return path


def storescu_tls(node: NodeProcess, files: list[Path], tls: list[str | Path]) -> dict[str, str]:
    out = run_storescu([*map(str, tls), "-aet", "MODALITY1", "-aec", "CXR_NODE", "127.0.0.1",
                        str(node.port), *map(str, files)], timeout=60)
    return {f: parse_storescu(out).get(f, f"no response:\n{out[-1500:]}") for f in map(str, files)}


def trusted(pki: PKI) -> list[str | Path]:
    return ["+tls", pki.modality.key, pki.modality.cert, "+cf", pki.ca.cert]


def stored(node: NodeProcess, path: Path) -> bool:
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    return bool(node.db("SELECT 1 FROM instances WHERE sop_instance_uid = ?", uid))


def pynetdicom_store(node: NodeProcess, path: Path, context: ssl.SSLContext) -> int | None:
    """Status of a C-STORE over TLS, or None when no association came about."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_NODE", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def scu_context(pki: PKI, identity: Identity | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.cert)
    if identity:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


def test_trusted_modalities_store_over_tls(tls_node: NodeProcess, pki: PKI, image: Path,
                                           tmp_path: Path):
    assert storescu_tls(tls_node, [image], trusted(pki)) == {str(image): "Success"}
    assert stored(tls_node, image)
    # the check docs/operations.md gives after a certificate rotation
    echo = subprocess.run(["/usr/bin/echoscu", "-aet", "MODALITY1", "-aec", "CXR_NODE",
                           *map(str, trusted(pki)), "127.0.0.1", str(tls_node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    other = tmp_path / "other.dcm"
    make_cxr(generate_uid(), rows=32, columns=32).save_as(other, enforce_file_format=True)
    # a pynetdicom SCU that also checks the node's certificate names the address it called
    assert pynetdicom_store(tls_node, other, scu_context(pki, pki.modality)) == 0x0000
    assert stored(tls_node, other)


def test_untrusted_missing_or_no_tls_is_refused_and_others_carry_on(
    tls_node: NodeProcess, pki: PKI, tmp_path: Path
):
    files = []
    for name in ("stranger", "anonymous", "plain", "pynetdicom-no-cert", "after"):
        files.append(tmp_path / f"{name}.dcm")
        make_cxr(generate_uid(), rows=32, columns=32).save_as(files[-1], enforce_file_format=True)
    stranger, anonymous, plain, no_cert, after = files
    before = len(tls_node.events("association.tls_refused"))
    refused = [
        storescu_tls(tls_node, [stranger], ["+tls", pki.stranger.key, pki.stranger.cert,
                                            "+cf", pki.ca.cert]),
        storescu_tls(tls_node, [anonymous], ["+tla", "+cf", pki.ca.cert]),  # TLS, no certificate
        storescu_tls(tls_node, [plain], []),  # DICOM without TLS on the TLS port
    ]
    for answer in refused:
        assert "Success" not in answer.values(), answer
    assert pynetdicom_store(tls_node, no_cert, scu_context(pki, None)) is None
    assert not any(stored(tls_node, f) for f in files)
    reasons = [e["reason"] for e in tls_node.events("association.tls_refused")[before:]]
    assert len(reasons) == 4, reasons
    assert any("CERTIFICATE_VERIFY_FAILED" in r for r in reasons), reasons
    assert sum("sent no certificate" in r for r in reasons) == 2, reasons
    assert any("does not speak TLS" in r for r in reasons), reasons
    assert all(e["peer"] == "127.0.0.1" for e in tls_node.events("association.tls_refused"))
    assert storescu_tls(tls_node, [after], trusted(pki)) == {str(after): "Success"}


def test_silent_peers_neither_block_senders_nor_stay_connected(tls_node: NodeProcess, pki: PKI,
                                                                image: Path):
    """Connections that never start the handshake: a real sender still gets through at once."""
    silent = [socket.create_connection(("127.0.0.1", tls_node.port)) for _ in range(3)]
    try:
        started = time.monotonic()
        fresh = image.with_name("after-silent.dcm")
        make_cxr(generate_uid(), rows=32, columns=32).save_as(fresh, enforce_file_format=True)
        assert storescu_tls(tls_node, [fresh], trusted(pki)) == {str(fresh): "Success"}
        assert time.monotonic() - started < 4  # well inside the 5 s handshake limit
        for s in silent:  # and the node hangs up on them once the ACSE timeout has passed
            s.settimeout(15)
            assert s.recv(1) == b""
        assert wait_for(lambda: sum("no TLS handshake within 5 s" in e["reason"]
                                    for e in tls_node.events("association.tls_refused")) >= 3, 5)
    finally:
        for s in silent:
            s.close()


# --- the sender --------------------------------------------------------------------------------


class TlsStorescp:
    """dcmtk's storescp with TLS in a network namespace: a PACS that wants our certificate too."""

    PORT = 2762  # DICOM TLS's registered port; the namespace is private

    def __init__(self, ns: NetworkNamespace, identity: Identity, ca: Path, directory: Path):
        self.ns = ns
        self.received = directory / "received"
        self.received.mkdir(parents=True)
        self.log = directory / "storescp.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(ns.command([
                STORESCP, "-v", "+tls", str(identity.key), str(identity.cert), "+cf", str(ca),
                "-aet", "PACS", "-od", str(self.received), str(self.PORT)]),
                stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: ns.call(accepts, self.PORT) or self.proc.poll() is not None, 20):
            raise TimeoutError(self.log.read_text())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    with NetworkNamespace() as ns:
        yield ns


def send_to(ns: NetworkNamespace, tls: TLSConfig, image: Path):
    store = DicomStore(DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                        port=TlsStorescp.PORT, tls=tls, timeout_seconds=10),
                       "CXR_NODE")
    return ns.call(store.send, Draft("1.2.3", "study", {"sr": image}))


@pytest.mark.parametrize("pacs_is_ours", [True, False], ids=["our-ca", "stranger"])
def test_node_sends_only_to_a_pacs_whose_certificate_chains_to_our_ca(
    pacs_is_ours: bool, pki: PKI, netns: NetworkNamespace, tmp_path: Path, image: Path
):
    pacs = TlsStorescp(netns, pki.pacs if pacs_is_ours else pki.stranger, pki.ca.cert, tmp_path)
    try:
        delivery = send_to(netns, tls_config(pki.node, pki.ca.cert), image)
    finally:
        pacs.close()
    received = list(pacs.received.iterdir())
    if pacs_is_ours:
        assert delivery.outcome == "delivered", (delivery, pacs.log.read_text()[-2000:])
        assert len(received) == 1
        sent = pydicom.dcmread(received[0])
        assert sent.SOPInstanceUID == pydicom.dcmread(image).SOPInstanceUID
    else:
        # no association: retried with backoff, dead after dispatch.max_attempts (dispatch rules)
        assert delivery.outcome == "retry", delivery
        assert received == []


def certificate_sha256(identity: Identity) -> str:
    der = ssl.PEM_cert_to_DER_cert(identity.cert.read_text())
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(("pacs_name", "settings", "delivered"), [
    ("IP:127.0.0.1", {}, True),
    ("DNS:pacs.hospital.example", {"server_name": "pacs.hospital.example"}, True),
    # a certificate of the same CA issued to another host (a modality, say) is not the PACS
    ("IP:10.20.30.5,DNS:cr-ed-1.hospital.example", {}, False),
    ("DNS:pacs.hospital.example", {}, False),
    # a PACS whose certificate names neither: its pinned fingerprint identifies it
    ("DNS:cr-ed-1.hospital.example", {"pin": "own"}, True),
    ("IP:127.0.0.1", {"pin": "another"}, False),
], ids=["ip-in-san", "server-name", "modality-certificate", "other-name", "pinned",
        "pin-mismatch"])
def test_node_sends_only_to_the_pacs_its_certificate_names(
    pacs_name: str, settings: dict[str, str], delivered: bool, pki: PKI, netns: NetworkNamespace,
    tmp_path: Path, image: Path,
):
    pacs_identity = make_identity(tmp_path, "pacs-under-test", pki.ca, san=pacs_name)
    pin = settings.pop("pin", None)
    if pin:
        settings["pinned_sha256"] = [certificate_sha256(pacs_identity if pin == "own" else pki.pacs)]
    pacs = TlsStorescp(netns, pacs_identity, pki.ca.cert, tmp_path)
    try:
        delivery = send_to(netns, tls_config(pki.node, pki.ca.cert, **settings), image)
    finally:
        pacs.close()
    received = list(pacs.received.iterdir())
    if delivered:
        assert delivery.outcome == "delivered", (delivery, pacs.log.read_text()[-2000:])
        assert len(received) == 1
    else:
        assert delivery.outcome == "retry" and received == [], delivery
        expected = "is not one of tls.pinned_sha256" if pin else "mismatch, certificate is not valid"
        assert "TLS: the certificate of PACS@127.0.0.1" in delivery.reason, delivery
        assert expected in delivery.reason, delivery


def test_pinned_fingerprints_are_validated(pki: PKI):
    with pytest.raises(ValueError, match="64 hex digits"):
        tls_config(pki.node, pki.ca.cert, pinned_sha256=["abc"])
    colons = ":".join(certificate_sha256(pki.pacs).upper()[i:i + 2] for i in range(0, 64, 2))
    assert tls_config(pki.node, pki.ca.cert, pinned_sha256=[colons]).pinned_sha256 == [
        certificate_sha256(pki.pacs)]


# --- client certificate subjects ---------------------------------------------------------------


def test_a_certificate_subject_rule_admits_that_certificate_only(pki: PKI, tmp_path: Path,
                                                                 image: Path):
    """MODALITY1 may call only with the modality's certificate: the PACS's, though it chains to
    the same CA, is rejected for that AE title, and admitted for its own."""
    config = write_config(tmp_path, node={"receivers": 1, "tls": {
        "certificate": str(pki.node.cert), "private_key": str(pki.node.key),
        "ca_certificates": str(pki.ca.cert), "require_client_certificate": True,
    }}, accept=[
        {"ae_title": "MODALITY1", "network": "127.0.0.1/32", "certificate_subject": "CN=modality"},
        {"ae_title": "PACS_MAIN", "network": "127.0.0.1/32", "certificate_subject": "CN=pacs"},
    ])
    as_pacs = ["+tls", pki.pacs.key, pki.pacs.cert, "+cf", pki.ca.cert]
    other = tmp_path / "other.dcm"
    make_cxr(generate_uid(), rows=32, columns=32).save_as(other, enforce_file_format=True)
    with NodeProcess(config) as node:
        assert storescu_tls(node, [image], trusted(pki)) == {str(image): "Success"}
        assert "Success" not in storescu_tls(node, [other], as_pacs).values()
        assert not stored(node, other)
        [rejected] = node.events("association.rejected")
        assert "matches no certificate_subject allowed for AE 'MODALITY1'" in rejected["reason"]
        trail = read_trail(node.state_dir / "audit.jsonl").records
        assert [r["cause"] for r in trail if r["event"] == "association.rejected"] == [
            "certificate_subject"]
        out = run_storescu([*map(str, as_pacs), "-aet", "PACS_MAIN", "-aec", "CXR_NODE",
                            "127.0.0.1", str(node.port), str(other)], timeout=60)
        assert parse_storescu(out) == {str(other): "Success"}, out[-1500:]


def test_a_certificate_subject_needs_verified_client_certificates(tmp_path: Path):
    rule = {"ae_title": "MODALITY1", "network": "*", "certificate_subject": "CN=modality"}
    with pytest.raises(ConfigError, match=r"'accept'.*node.tls with ca_certificates"):
        load_config(write_config(tmp_path, accept=[rule]))
    with pytest.raises(ConfigError, match=r"accept\[0\].certificate_subject.*CN=CR_ED_1"):
        load_config(write_config(tmp_path, accept=[{**rule, "certificate_subject": "XX=1"}]))
