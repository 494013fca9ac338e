"""DICOMweb STOW-RS destinations: drafts filed by HTTP in the images' study, each answer classified.

Peers are real: Orthanc with its DICOMweb plugin (in a private network namespace, tests/pacs.py),
behind HTTP Basic authentication as a hospital runs it; and a small DICOMweb server on 127.0.0.1
(http.server, TLS with certificates made by openssl) that answers what a test scripts, built from
the instances it received: the STOW-RS answers of PS3.18 10.5.3 that Orthanc never gives, an
answer that never ends, a redirect, a server that wants a token or a client certificate.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from nodeproc import NodeProcess, wait_for, write_config
from pacs import Orthanc, running_orthanc
from pydicom.dataset import Dataset
from test_dispatch import (
    SETTINGS,
    Clock,
    StoreResponseTrap,
    _hang_up,
    as_draft,
    dataset_bytes,
    file_report,
    make_sr,
    node_config,
    rows,
    run,
)
from test_tls import Identity, make_identity

from cxr_node.config import ConfigError, load_config
from cxr_node.destinations.dicomweb import (
    DicomWebDestination,
    DicomWebStore,
    credential_env,
)
from cxr_node.dispatch import Outbox, requeue
from cxr_node.renditions import BUILDERS
from cxr_node.report import write_sr
from cxr_node.send import check_connections
from cxr_node.store import Store, StudyState

USER = "cxr-node"
PASSWORD = "orthanc-pw-7d1f"  # noqa: S105 (a test's)
CREDENTIAL = "orthanc-password"
BACKOFF = 10.0


# --- building blocks ---------------------------------------------------------------------------


def web(name: str, url: str, **settings: Any) -> dict[str, Any]:
    """A dicomweb destination entry, as a YAML file would give it."""
    plain = {"plain_http_on_loopback": True} if url.startswith("http:") else {}
    return {"type": "dicomweb", "name": name, "url": url, "timeout_seconds": 5, **plain,
            **settings}


def to_orthanc(pacs: Orthanc | str, **settings: Any) -> dict[str, Any]:
    url = pacs if isinstance(pacs, str) else pacs.dicomweb_url
    return web("viewer", url, authentication="basic", username=USER, credential=CREDENTIAL,
               **settings)


def stow_answer(failed: list[tuple[str, int]] = (),  # type: ignore[assignment]
                referenced: list[tuple[str, int | None]] = ()) -> bytes:  # type: ignore[assignment]
    """A STOW-RS answer dataset (PS3.18 10.5.3) in DICOM JSON: failed (UID, FailureReason) and
    stored (UID, WarningReason or None) instances."""
    ds = Dataset()
    ds.FailedSOPSequence = [_item(uid, FailureReason=code) for uid, code in failed]
    ds.ReferencedSOPSequence = [
        _item(uid, **({"WarningReason": code} if code is not None else {}))
        for uid, code in referenced]
    return json.dumps(ds.to_json_dict()).encode()


def _item(uid: str, **reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    item.ReferencedSOPInstanceUID = uid
    for keyword, code in reason.items():
        setattr(item, keyword, code)
    return item


Answer = Callable[[list[str]], tuple[int, bytes, dict[str, str]]]


def answer(status: int, body: bytes = b"", content_type: str = "application/dicom+json",
           **headers: str) -> Answer:
    return lambda uids: (status, body, {"Content-Type": content_type, **headers})


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    instances: list[Dataset]


class StowPeer:
    """A DICOMweb server on 127.0.0.1: each request gets the next scripted answer (a function of
    the SOP Instance UIDs it received); once the script is used up, STOW-RS stores (200, each
    instance referenced) and QIDO-RS finds nothing. With ``authorization`` anything else in the
    Authorization header gets a 401. "flood" answers 200 with a body that never ends."""

    def __init__(self, *script: Answer | str, tls: ssl.SSLContext | None = None,
                 authorization: str | None = None):
        self.script = list(script)
        self.requests: list[Request] = []
        self.authorization = authorization
        self.flooded = 0  # bytes of an endless answer that the client took
        self.flood_ended = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                peer._answer(self)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/dicom-web") -> str:
        scheme = "https" if isinstance(self.server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        instances = _parts(handler.headers.get("Content-Type", ""), body)
        self.requests.append(Request(handler.command, handler.path, dict(handler.headers),
                                     instances))
        uids = [str(ds.SOPInstanceUID) for ds in instances]
        if self.authorization and handler.headers.get("Authorization") != self.authorization:
            status, content, headers = 401, b"", {"WWW-Authenticate": 'Bearer realm="pacs"'}
        elif self.script and self.script[0] == "flood":
            self.script.pop(0)
            return self._flood(handler)
        elif self.script:
            status, content, headers = self.script.pop(0)(uids)  # type: ignore[operator]
        elif handler.command == "GET":
            status, content, headers = 200, b"[]", {"Content-Type": "application/dicom+json"}
        else:
            status, content = 200, stow_answer(referenced=[(uid, None) for uid in uids])
            headers = {"Content-Type": "application/dicom+json"}
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(content))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(content)

    def _flood(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b" " * 65536
        try:
            while self.flooded < 256 << 20:
                handler.wfile.write(chunk)
                self.flooded += len(chunk)
        except OSError:
            pass  # the client hung up
        handler.close_connection = True
        self.flood_ended.set()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parts(content_type: str, body: bytes) -> list[Dataset]:
    """The application/dicom parts of a multipart/related body, read as DICOM."""
    if not content_type.startswith("multipart/related"):
        return []
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return [pydicom.dcmread(BytesIO(part.get_payload(decode=True)))
            for part in message.iter_parts()]


@pytest.fixture
def peer() -> Iterator[Callable[..., StowPeer]]:
    started: list[StowPeer] = []

    def start(*script: Answer | str, **kwargs: Any) -> StowPeer:
        started.append(StowPeer(*script, **kwargs))
        return started[-1]

    yield start
    for p in started:
        p.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def chest(cxr_dir: Path) -> Path:
    return cxr_dir / "CR-MONO1-10-chest.dcm"


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    """Orthanc's password, where the node reads it outside systemd."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv(credential_env(CREDENTIAL), PASSWORD)
    return PASSWORD


def store_for(tmp_path: Path, *entries: dict[str, Any]) -> tuple[Any, Store]:
    config = node_config(tmp_path, *entries)
    return config, Store(config.database_path)


def sender(entry: dict[str, Any]) -> DicomWebStore:
    return DicomWebStore(DicomWebDestination.model_validate(entry))


# --- settings: nothing secret in the YAML, nothing in clear on a network ------------------------


@pytest.mark.parametrize(
    ("entry", "key", "expected"),
    [
        ({"url": "http://pacs.hospital.example/dicom-web"}, "url",
         "an https:// URL: drafts and credentials never cross a network in clear"),
        ({"url": "http://10.0.0.5:8042/dicom-web", "plain_http_on_loopback": True}, "url",
         "http:// only to a loopback address"),
        ({"url": "http://127.0.0.1:8042/dicom-web"}, "plain_http_on_loopback",
         "true to send in clear to this loopback http:// url"),
        ({"url": "https://pacs.hospital.example/dicom-web"}, "tls",
         "tls with ca_certificates for an https:// url"),
        ({"url": "https://pacs.hospital.example/dicom-web/studies", "tls": {}}, "url",
         "without /studies"),
        ({"url": "ftp://pacs/dicom-web"}, "url", "an https:// URL"),
        ({"url": "https://pacs/dicom web"}, "url", "without spaces"),
        ({"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
          "authentication": "basic", "credential": "pw"}, "username",
         "a user name with authentication: basic"),
        ({"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
          "authentication": "bearer"}, "credential",
         "the name of the systemd credential holding the token"),
        ({"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
          "authentication": "bearer", "credential": "../../etc/shadow"}, "credential",
         "string should match pattern"),
        ({"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
          "authentication": "basic", "username": "a:b", "credential": "pw"}, "username",
         "without ':'"),
    ],
    ids=["http-on-a-network", "http-to-another-host", "http-not-asked-for", "https-without-ca",
         "studies-in-url", "other-scheme", "space", "basic-without-user", "bearer-without-secret",
         "credential-as-a-path", "colon-in-user"],
)
def test_settings_refuse_what_would_travel_in_clear_or_go_unchecked(
    tmp_path: Path, entry: dict[str, Any], key: str, expected: str
) -> None:
    entry = {"type": "dicomweb", "name": "viewer", **entry}
    if entry.get("tls") == {}:
        entry["tls"] = {"ca_certificates": str(tmp_path / "ca.pem")}
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps({"destinations": [entry]}, indent=1))  # JSON is YAML
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [problem] = err.value.problems
    assert problem.startswith(f"{path}:")
    assert f"'destinations[0].{key}'" in problem
    assert expected in problem


@pytest.mark.parametrize(
    "entry",
    [
        {"url": "https://cxr-node:Yq9-pw@pacs.hospital.example/dicom-web"},
        {"url": "https://pacs.hospital.example/dicom-web?access_token=Yq9-pw"},
        {"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
         "authentication": "basic", "username": "cxr-node", "password": "Yq9-pw"},
        {"url": "http://127.0.0.1/dicom-web", "plain_http_on_loopback": True,
         "authentication": "bearer", "token": "Yq9-pw"},
    ],
    ids=["user-info", "query", "password-key", "token-key"],
)
def test_a_secret_written_in_the_yaml_is_refused_and_never_repeated(
    tmp_path: Path, entry: dict[str, Any]
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps({"destinations": [{"type": "dicomweb", "name": "viewer",
                                                  "tls": {"ca_certificates": "ca.pem"},
                                                  **entry}]}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "destinations[0]" in str(err.value)
    assert "Yq9-pw" not in str(err.value)


def test_settings_as_a_hospital_writes_them(tmp_path: Path) -> None:
    (tmp_path / "hospital-ca.pem").write_text("")
    path = tmp_path / "node.yaml"
    path.write_text(
        "destinations:\n"
        "  - type: dicomweb\n"
        "    name: viewer\n"
        "    url: https://pacs.hospital.example:8443/dicom-web/\n"
        "    authentication: bearer\n"
        "    credential: viewer-token\n"
        "    tls: {ca_certificates: hospital-ca.pem}\n"
        "    renditions: [sr, pdf]\n")
    [viewer] = load_config(path).destinations
    assert isinstance(viewer, DicomWebDestination)
    assert viewer.url == "https://pacs.hospital.example:8443/dicom-web"  # the node adds /studies
    assert viewer.tls is not None and viewer.tls.ca_certificates == tmp_path / "hospital-ca.pem"
    assert (viewer.lanes, viewer.timeout_seconds, viewer.renditions) == (2, 30.0, ["sr", "pdf"])
    assert credential_env("viewer-token") == "CXR_NODE_CREDENTIAL_VIEWER_TOKEN"


# --- Orthanc with its DICOMweb plugin ----------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True,
                         users={USER: PASSWORD}) as pacs:
        yield pacs


def test_a_draft_is_filed_in_the_images_study_as_written(
    tmp_path: Path, cxr_dir: Path, orthanc: Orthanc, clock: Clock, password: str,
) -> None:
    image = cxr_dir / "RG1_J2KI.dcm"
    assert orthanc.store([image]) == {str(image): "Success"}
    config, store = store_for(tmp_path, to_orthanc(orthanc))
    draft = make_sr(tmp_path, image, "stow-filed")
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock), orthanc.ns)

    row = rows(store)["viewer"]
    assert (row["state"], row["attempts"], row["last_status"], row["reason"]) == (
        "delivered", 1, "0x0000", None)
    assert store.study(draft.study_uid).state == StudyState.SENT
    [sr_id] = orthanc.find(draft.sr_uid)
    [image_id] = orthanc.find(pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID)
    assert orthanc.study_uid_of(sr_id) == orthanc.study_uid_of(image_id) == draft.study_uid
    assert dataset_bytes(orthanc.file(sr_id)) == dataset_bytes(draft.path.read_bytes())


def with_renditions(store: Store, draft: Any, directory: Path) -> dict[str, Path]:
    """The draft's PDF and page, built and filed as the Reporter files them."""
    sr = pydicom.dcmread(draft.path)
    files = {}
    with store.transaction() as db:
        for rendition, build in BUILDERS.items():
            document = build(sr, SETTINGS)
            files[rendition] = directory / f"{rendition}-{document.SOPInstanceUID}.dcm"
            write_sr(document, files[rendition])
            db.execute("""INSERT INTO documents (sop_instance_uid, sr_uid, study_uid, rendition,
                          path, created_at) VALUES (?, ?, ?, ?, ?, ?)""",
                       (document.SOPInstanceUID, draft.sr_uid, draft.study_uid, rendition,
                        str(files[rendition]), time.time()))
    return files


@pytest.mark.slow
def test_every_rendition_asked_for_goes_in_one_request_into_the_images_study(
    tmp_path: Path, cxr_dir: Path, orthanc: Orthanc, clock: Clock, password: str,
) -> None:
    image = cxr_dir / "RG1_JLSN.dcm"
    assert orthanc.store([image]) == {str(image): "Success"}
    config, store = store_for(tmp_path, to_orthanc(orthanc, renditions=["sr", "pdf", "page"]))
    draft = make_sr(tmp_path, image, "stow-renditions")
    file_report(store, config, draft, clock())
    files = {"sr": draft.path, **with_renditions(store, draft, tmp_path)}
    run(Outbox(config, store, clock), orthanc.ns)

    assert rows(store)["viewer"]["state"] == "delivered"
    for rendition, path in files.items():
        written = pydicom.dcmread(path, stop_before_pixels=True)
        [stored] = orthanc.find(written.SOPInstanceUID)
        assert orthanc.study_uid_of(stored) == draft.study_uid, rendition
        assert dataset_bytes(orthanc.file(stored)) == dataset_bytes(path.read_bytes()), rendition


class AnswerTrap(StoreResponseTrap):
    """A TCP proxy to the server that lets the first request through and drops its answer: the
    server has the draft, the sender never hears so. Later connections pass untouched."""

    def __init__(self, upstream_port: int):
        super().__init__(upstream_port, on_response=lambda: None)

    def _watch(self, server: socket.socket, client: socket.socket) -> None:
        if self.sprung.is_set():
            return self._pump(server, client)
        try:
            server.recv(65536)  # the answer has begun: the server has done its work
        except OSError:
            pass
        self.sprung.set()
        _hang_up(client, server)


def test_a_resend_after_a_crash_keeps_one_copy(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock, password: str,
) -> None:
    trap = orthanc.ns.call(AnswerTrap, Orthanc.HTTP_PORT)
    try:
        config, store = store_for(tmp_path, to_orthanc(f"http://127.0.0.1:{trap.port}/dicom-web"))
        draft = make_sr(tmp_path, chest, "stow-crash")
        file_report(store, config, draft, clock())
        run(Outbox(config, store, clock), orthanc.ns)
        assert trap.sprung.is_set()
        row = rows(store)["viewer"]
        assert (row["state"], row["attempts"]) == ("pending", 1)
        assert "closed without an answer" in row["reason"]
        assert len(orthanc.find(draft.sr_uid)) == 1

        # the node dies there: its row still says 'sending'; the next start sends it again
        with store.transaction() as db:
            db.execute("UPDATE outbox SET state = 'sending' WHERE id = ?", (row["id"],))
        run(Outbox(config, store, clock), orthanc.ns)
        row = rows(store)["viewer"]
        assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 2, "0x0000")
        assert len(orthanc.find(draft.sr_uid)) == 1
        assert store.study(draft.study_uid).state == StudyState.SENT
    finally:
        trap.close()


def test_refused_credentials_are_a_dead_letter_until_fixed_and_requeued(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv(credential_env(CREDENTIAL), "not-the-password")
    config, store = store_for(tmp_path, to_orthanc(orthanc))
    draft = make_sr(tmp_path, chest, "stow-401")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    run(outbox, orthanc.ns)
    clock.advance(3600)
    run(outbox, orthanc.ns)  # a dead letter waits for an admin

    row = rows(store)["viewer"]
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["reason"].startswith("HTTP 401 Unauthorized: the server refused the credentials")
    assert "not-the-password" not in row["reason"]
    assert orthanc.find(draft.sr_uid) == []
    assert store.study(draft.study_uid).state == StudyState.FAILED

    monkeypatch.setenv(credential_env(CREDENTIAL), PASSWORD)  # IT fixes the credential...
    assert requeue(store, row_id=row["id"], now=clock()) == 1  # ...and requeues the row
    run(outbox, orthanc.ns)
    assert rows(store)["viewer"]["state"] == "delivered"
    assert len(orthanc.find(draft.sr_uid)) == 1
    assert store.study(draft.study_uid).state == StudyState.SENT


def test_a_missing_secret_is_a_dead_letter_that_names_where_it_was_looked_for(
    tmp_path: Path, chest: Path, clock: Clock, peer: Callable[..., StowPeer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # a systemd service without it
    monkeypatch.delenv(credential_env(CREDENTIAL), raising=False)
    server = peer()
    config, store = store_for(tmp_path, to_orthanc(server.url()))
    file_report(store, config, make_sr(tmp_path, chest, "stow-no-secret"), clock())
    run(Outbox(config, store, clock))
    row = rows(store)["viewer"]
    assert row["state"] == "dead"
    assert row["reason"] == (
        f"authentication: no password: neither the systemd credential '{CREDENTIAL}' "
        f"($CREDENTIALS_DIRECTORY) nor ${credential_env(CREDENTIAL)} is set")
    assert server.requests == []


@pytest.mark.slow
def test_orthanc_down_for_a_while_is_retried_then_delivered_once(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock, password: str,
) -> None:
    config, store = store_for(tmp_path, to_orthanc(orthanc))
    draft = make_sr(tmp_path, chest, "stow-down")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    with orthanc.down():
        for attempt in (1, 2):
            run(outbox, orthanc.ns)
            row = rows(store)["viewer"]
            assert (row["state"], row["attempts"]) == ("pending", attempt)
            assert row["reason"] == f"no answer from {orthanc.dicomweb_url}: connection refused"
            clock.advance(BACKOFF * 2 ** attempt)
    run(outbox, orthanc.ns)
    row = rows(store)["viewer"]
    assert (row["state"], row["attempts"]) == ("delivered", 3)
    assert len(orthanc.find(draft.sr_uid)) == 1


def test_a_document_orthanc_refuses_is_dead_with_its_failure_reason(
    tmp_path: Path, chest: Path, orthanc: Orthanc, clock: Clock, password: str,
) -> None:
    draft = make_sr(tmp_path, chest, "stow-refused")
    broken = pydicom.dcmread(draft.path)
    del broken.SeriesInstanceUID  # Orthanc files nothing without it
    broken.save_as(draft.path)
    config, store = store_for(tmp_path, to_orthanc(orthanc))
    file_report(store, config, draft, clock())
    run(Outbox(config, store, clock), orthanc.ns)

    row = rows(store)["viewer"]
    assert (row["state"], row["last_status"]) == ("dead", "0xC000")
    assert row["reason"] == "HTTP 400 Bad Request: sr: FailureReason 0xC000 (Cannot Understand)"
    assert orthanc.find(draft.sr_uid) == []


def test_config_check_connect_proves_url_and_credentials_without_storing(
    tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch, password: str,
) -> None:
    config = node_config(tmp_path, to_orthanc(orthanc))
    before = len(orthanc.instances())
    [(ok, line)] = [c for c in orthanc.ns.call(lambda: list(check_connections(config)))
                    if c[1].startswith("destination viewer")]
    assert ok, line
    assert line.startswith(f"destination viewer: QIDO-RS {orthanc.dicomweb_url}/studies: "
                           "HTTP 200 OK in ")
    assert line.endswith(" ms: URL and credentials accepted")

    monkeypatch.setenv(credential_env(CREDENTIAL), "not-the-password")
    [(ok, line)] = [c for c in orthanc.ns.call(lambda: list(check_connections(config)))
                    if c[1].startswith("destination viewer")]
    assert not ok and "FAILED: HTTP 401 Unauthorized" in line
    with orthanc.down():
        [(ok, line)] = [c for c in orthanc.ns.call(lambda: list(check_connections(config)))
                        if c[1].startswith("destination viewer")]
    assert not ok and line.endswith("FAILED: no answer from "
                                    f"{orthanc.dicomweb_url}: connection refused")
    assert len(orthanc.instances()) == before


# --- every answer has one meaning --------------------------------------------------------------


PATIENT_TEXT = b"Patient DOE^JANE (ID 12345678) is locked by another user"


@pytest.mark.parametrize(
    ("script", "outcome", "status", "reason"),
    [
        (lambda uids: (200, stow_answer(referenced=[(uids[0], None)]),
                       {"Content-Type": "application/dicom+json; charset=utf-8"}),
         "delivered", 0x0000, ""),
        (lambda uids: (200, stow_answer(failed=[(uids[0], 0xA900)]), {}),
         "dead", 0xA900, "HTTP 200 OK: sr: FailureReason 0xA900 (Data Set Does Not Match SOP "
                         "Class)"),
        (lambda uids: (202, stow_answer(referenced=[(uids[0], 0xB000)]), {}),
         "delivered", 0xB000, "HTTP 202 Accepted: sr: WarningReason 0xB000 (Coercion of Data "
                              "Elements)"),
        (answer(202), "delivered", None, "HTTP 202 Accepted: stored, with warnings it did not "
                                         "detail"),
        (lambda uids: (202, stow_answer(failed=[(uids[0], 0x0110)]), {}),
         "dead", 0x0110, "HTTP 202 Accepted: sr: FailureReason 0x0110 (Processing Failure)"),
        (lambda uids: (409, stow_answer(failed=[(uids[0], 0xC000)]), {}),
         "dead", 0xC000, "HTTP 409 Conflict: sr: FailureReason 0xC000 (Cannot Understand)"),
        (lambda uids: (409, stow_answer(failed=[(uids[0], 0xA700)]), {}),
         "retry", 0xA700, "HTTP 409 Conflict: sr: FailureReason 0xA700 (Refused: Out of "
                          "Resources)"),
        (lambda uids: (409, stow_answer(failed=[("1.2.3", 0xC000), ("1.2.4", 0xC000)]), {}),
         "dead", 0xC000, "HTTP 409 Conflict: an unidentified instance: FailureReason 0xC000 "
                         "(Cannot Understand); an unidentified instance: FailureReason 0xC000 "
                         "(Cannot Understand)"),
        (answer(409), "dead", None, "HTTP 409 Conflict"),
        (answer(400, PATIENT_TEXT, "text/plain"), "dead", None, "HTTP 400 Bad Request"),
        (answer(403), "dead", None, "HTTP 403 Forbidden: the server refused the credentials "
                                    "the right to store; fix that there, then requeue"),
        (answer(404), "dead", None, "HTTP 404 Not Found: no STOW-RS service at url/studies; "
                                    "check url"),
        (answer(413), "dead", None, "HTTP 413 Request Entity Too Large: the draft is larger "
                                    "than the server takes"),
        (answer(429), "retry", None, "HTTP 429 Too Many Requests"),
        (answer(500, PATIENT_TEXT, "text/plain"), "retry", None, "HTTP 500 Internal Server "
                                                                 "Error"),
        (lambda uids: (503, stow_answer(failed=[(uids[0], 0x0110)]), {}), "retry", None,
         "HTTP 503 Service Unavailable: sr: FailureReason 0x0110 (Processing Failure)"),
        (answer(200, b"{not json", "application/dicom+json"), "delivered", 0x0000, ""),
        (answer(200, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", '
                     b'"Value": ["x"]}}]}}'), "dead", None,
         "HTTP 200 OK: an unidentified instance: no FailureReason given"),
    ],
    ids=["200", "200-failed", "202-warning", "202-bare", "202-failed", "409-cannot-understand",
         "409-out-of-resources", "409-others", "409-bare", "400-text", "403", "404", "413", "429",
         "500", "503-detailed", "200-unreadable", "200-bad-reason"],
)
def test_every_stow_answer_has_one_meaning(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], script: Answer, outcome: str,
    status: int | None, reason: str,
) -> None:
    server = peer(script)
    draft = make_sr(tmp_path, chest, "answers")
    delivery = sender(web("viewer", server.url())).send(as_draft(draft))
    assert (delivery.outcome, delivery.status, delivery.reason) == (outcome, status, reason)
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/dicom-web/studies")
    assert request.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert request.headers["Accept"] == "application/dicom+json"
    assert request.headers["Host"] == f"127.0.0.1:{server.port}"
    assert request.headers["User-Agent"].startswith("cxr-node/")
    assert [str(ds.SOPInstanceUID) for ds in request.instances] == [draft.sr_uid]


def test_a_5xx_is_retried_with_backoff_then_delivered(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], clock: Clock,
) -> None:
    server = peer(answer(503), answer(502))
    config, store = store_for(tmp_path, web("viewer", server.url()))
    draft = make_sr(tmp_path, chest, "stow-5xx")
    file_report(store, config, draft, clock())
    outbox = Outbox(config, store, clock)
    for attempt, said in ((1, "HTTP 503 Service Unavailable"), (2, "HTTP 502 Bad Gateway")):
        run(outbox)
        row = rows(store)["viewer"]
        assert (row["state"], row["attempts"], row["reason"]) == ("pending", attempt, said)
        clock.advance(BACKOFF * 2 ** attempt)
    run(outbox)
    assert (rows(store)["viewer"]["state"], len(server.requests)) == ("delivered", 3)
    assert store.study(draft.study_uid).state == StudyState.SENT


def test_a_redirect_is_an_answer_not_an_order(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer],
) -> None:
    elsewhere = peer()
    server = peer(answer(307, Location=elsewhere.url()), answer(301, Location=elsewhere.url()))
    draft = make_sr(tmp_path, chest, "redirected")
    store = sender(web("viewer", server.url()))
    for said in ("HTTP 307 Temporary Redirect", "HTTP 301 Moved Permanently"):
        delivery = store.send(as_draft(draft))
        assert (delivery.outcome, delivery.reason) == (
            "dead", f"{said}: a redirect is not followed; set url to where the server points")
    assert elsewhere.requests == []  # the draft went nowhere it was not configured to go


def test_an_endless_answer_is_not_read(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer],
) -> None:
    server = peer("flood")
    draft = make_sr(tmp_path, chest, "flooded")
    delivery = sender(web("viewer", server.url())).send(as_draft(draft))
    assert (delivery.outcome, delivery.reason) == (
        "delivered", "HTTP 200 OK; its answer was not read: over 1 MiB")
    assert server.flood_ended.wait(30)
    assert server.flooded < 32 << 20  # what the socket buffers held, not the 256 MiB sent


def test_proxies_and_ca_bundles_from_the_environment_are_not_used(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], pki: WebPKI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    proxy.settimeout(0.5)
    address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, address)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.public_ca.cert))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.public_ca.cert))
    draft = make_sr(tmp_path, chest, "no-proxy")
    try:
        plain, public = peer(), peer(tls=server_context(pki.public_server))
        assert sender(web("viewer", plain.url())).send(as_draft(draft)).outcome == "delivered"
        refused = sender(web("viewer", public.url(), tls={"ca_certificates": str(pki.ca.cert)}))
        assert refused.send(as_draft(draft)).outcome == "retry"
        with pytest.raises(TimeoutError):
            proxy.accept()  # nothing went through the proxy the environment names
        assert public.requests == []
    finally:
        proxy.close()


# --- HTTPS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebPKI:
    """The hospital CA with a DICOMweb server, a server certificate for another host and the
    node's client certificate under it; a public CA (as certifi's) with a server of its own."""

    ca: Identity
    server: Identity
    other_host: Identity
    node: Identity
    public_ca: Identity
    public_server: Identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> WebPKI:
    d = tmp_path_factory.mktemp("web-pki")
    ca, public_ca = make_identity(d, "hospital-ca"), make_identity(d, "public-ca")
    return WebPKI(ca=ca, server=make_identity(d, "pacs", ca),
                  other_host=make_identity(d, "elsewhere", ca, san="DNS:pacs.elsewhere.example"),
                  node=make_identity(d, "cxr-node", ca), public_ca=public_ca,
                  public_server=make_identity(d, "public-pacs", public_ca))


def server_context(identity: Identity, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(identity.cert, identity.key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def over_https(server: StowPeer, pki: WebPKI, **tls: Any) -> dict[str, Any]:
    return web("viewer", server.url(), tls={"ca_certificates": str(pki.ca.cert), **tls})


def test_https_sends_only_to_the_server_its_certificate_names(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], pki: WebPKI,
) -> None:
    draft = make_sr(tmp_path, chest, "https")
    right = peer(tls=server_context(pki.server))
    assert sender(over_https(right, pki)).send(as_draft(draft)).outcome == "delivered"
    assert len(right.requests) == 1

    for identity, why in ((pki.other_host, "IP address mismatch, certificate is not valid for "
                                           "'127.0.0.1'."),
                          (pki.public_server, "unable to get local issuer certificate")):
        wrong = peer(tls=server_context(identity))
        delivery = sender(over_https(wrong, pki)).send(as_draft(draft))
        assert (delivery.outcome, delivery.reason) == (
            "retry", f"TLS: the certificate of 127.0.0.1:{wrong.port} was refused: {why}")
        assert wrong.requests == []


def test_public_cas_bundled_with_requests_are_not_trusted(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], pki: WebPKI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests loads its CA bundle (certifi's) into every verified connection; here that bundle
    # holds the public CA that signed the server's certificate, as certifi would for a real one
    monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", str(pki.public_ca.cert))
    server = peer(tls=server_context(pki.public_server))
    delivery = sender(over_https(server, pki)).send(as_draft(make_sr(tmp_path, chest, "public")))
    assert delivery.outcome == "retry" and "unable to get local issuer certificate" in \
        delivery.reason
    assert server.requests == []


def test_a_client_certificate_whose_key_is_a_systemd_credential(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], pki: WebPKI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "web-key").write_bytes(pki.node.key.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    server = peer(tls=server_context(pki.server, client_ca=pki.ca.cert))
    draft = make_sr(tmp_path, chest, "mtls")

    anonymous = sender(over_https(server, pki)).send(as_draft(draft))
    assert anonymous.outcome == "retry"
    assert anonymous.reason.startswith(f"TLS: the handshake with 127.0.0.1:{server.port} failed")
    with_key = sender(over_https(server, pki, certificate=str(pki.node.cert),
                                 private_key=str(tmp_path / "root-only.key"),
                                 private_key_credential="web-key"))
    assert with_key.send(as_draft(draft)).outcome == "delivered"
    assert len(server.requests) == 1


def test_a_tls_file_that_cannot_be_read_stops_the_node_at_start(
    tmp_path: Path, pki: WebPKI, peer: Callable[..., StowPeer],
) -> None:
    server = peer(tls=server_context(pki.server))
    for tls, problem in (
        ({"ca_certificates": str(tmp_path / "missing-ca.pem")},
         f"{tmp_path / 'missing-ca.pem'}: cannot read the CA certificates"),
        ({"ca_certificates": str(pki.ca.cert), "certificate": str(pki.node.cert),
          "private_key": str(pki.server.key)},
         f"{pki.server.key}: this private key does not belong to the certificate"),
    ):
        config, store = store_for(tmp_path, web("viewer", server.url(), tls=tls))
        with pytest.raises(ConfigError, match=problem):
            Outbox(config, store)
        [(ok, line), _broker] = check_connections(config)
        assert not ok and line.startswith(f"destination viewer: TLS files: {problem}")
    assert server.requests == []


def test_config_check_connect_shows_the_servers_certificate(
    tmp_path: Path, peer: Callable[..., StowPeer], pki: WebPKI,
) -> None:
    server = peer(tls=server_context(pki.server))
    [check] = sender(over_https(server, pki)).check()
    assert check.ok, check.line
    assert check.line.startswith(f"QIDO-RS {server.url()}/studies: HTTP 200 OK in ")
    assert " ms: URL and TLS accepted; TLS peer certificate: subject commonName=pacs; " \
           "issuer commonName=hospital-ca; expires " in check.line
    [request] = server.requests
    assert request.method == "GET" and request.path.startswith("/dicom-web/studies?")
    assert "StudyInstanceUID=" in request.path

    wrong = peer(tls=server_context(pki.other_host))
    [check] = sender(over_https(wrong, pki)).check()
    assert not check.ok and "was refused: IP address mismatch" in check.line


# --- the secret: in the request, nowhere else --------------------------------------------------


TOKEN = "tok-5c1f2e9a.Zm9vYmFy-xyz"  # noqa: S105
WRONG_TOKEN = "tok-wrong-88be1c"  # noqa: S105
BROKEN_TOKEN = "tok-broken-0d4a\nX-Injected: yes"  # noqa: S105
BASIC_PASSWORD = "basic-pw-3e7a0c"  # noqa: S105


@pytest.mark.slow
def test_the_secret_is_sent_and_appears_in_no_log_reason_or_config_check(
    tmp_path: Path, chest: Path, peer: Callable[..., StowPeer], clock: Clock,
) -> None:
    basic = "Basic " + base64.b64encode(f"{USER}:{BASIC_PASSWORD}".encode()).decode()
    bearer_server, basic_server = peer(authorization=f"Bearer {TOKEN}"), peer(authorization=basic)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "broken-token").write_text(BROKEN_TOKEN + "\n")
    env = {credential_env("good-token"): TOKEN, credential_env("wrong-token"): WRONG_TOKEN,
           credential_env("basic-password"): BASIC_PASSWORD,
           "CREDENTIALS_DIRECTORY": str(credentials)}
    entries = [
        web("good", bearer_server.url(), authentication="bearer", credential="good-token"),
        web("wrong", bearer_server.url(), authentication="bearer", credential="wrong-token"),
        web("broken", bearer_server.url(), authentication="bearer", credential="broken-token"),
        web("basic", basic_server.url(), authentication="basic", username=USER,
            credential="basic-password"),
    ]
    config_path = write_config(tmp_path, destinations=entries, logging={"level": "DEBUG"},
                               dispatch={"backoff_initial_seconds": 60})
    config = load_config(config_path)
    store = Store(config.database_path)
    file_report(store, config, make_sr(tmp_path, chest, "secret"), clock())
    store.close()

    with NodeProcess(config_path, env=env) as node:
        assert wait_for(lambda: {r["state"] for r in rows(Store(config.database_path)).values()}
                        <= {"delivered", "dead"}, 60), node.log()
        log = node.log()
    found = rows(Store(config.database_path))
    assert {name: r["state"] for name, r in found.items()} == {
        "good": "delivered", "wrong": "dead", "broken": "dead", "basic": "delivered"}
    assert found["wrong"]["reason"].startswith("HTTP 401 Unauthorized")
    assert found["broken"]["reason"] == (
        "authentication: the token in credential 'broken-token' is not a bearer token "
        "(RFC 6750: letters, digits, -._~+/ then =)")
    assert sorted(r.headers["Authorization"] for r in bearer_server.requests) == [
        f"Bearer {TOKEN}", f"Bearer {WRONG_TOKEN}"]
    assert [r.headers["Authorization"] for r in basic_server.requests] == [basic]

    checked = [subprocess.run([sys.executable, "-m", "cxr_node", "config", "check", *connect,
                               str(config_path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})
               for connect in ([], ["--connect"])]
    assert "credential: good-token" in checked[0].stdout
    assert "destination good: QIDO-RS" in checked[1].stdout
    shown = "\n".join([log, json.dumps([dict(r) for r in found.values()]),
                       (config.audit_path).read_text(), *(c.stdout + c.stderr for c in checked)])
    assert "outbox.delivered" in log and "Starting new HTTP connection" in log  # at DEBUG
    for secret in (TOKEN, WRONG_TOKEN, BROKEN_TOKEN.split("\n")[0], BASIC_PASSWORD,
                   basic.split()[1]):
        assert secret not in shown
