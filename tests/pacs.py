"""A real PACS for tests: Orthanc in a private network namespace, queried through its REST API.

Orthanc (and dcmtk's storescp) cannot bind to loopback only, so each PACS gets a network namespace
of its own with nothing but ``lo`` up: it listens on every address of a network that has no other
address, and nothing outside the namespace can reach it. Everything that talks to it runs in the
same namespace: commands through ``ip netns exec`` (``NetworkNamespace.command``, or
``NodeProcess(..., netns=ns.name)``), Python code on a thread that entered it with setns(2)
(``NetworkNamespace.call``). Threads started from such a thread stay in the namespace, so an
in-process Outbox, a pynetdicom association or a test proxy started through ``call`` live there too.

Needs root (or CAP_SYS_ADMIN) and iproute2; the namespace and Orthanc are always removed again.
"""

from __future__ import annotations

import base64
import ctypes
import itertools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from nodeproc import storescu

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian: orthanc-dicomweb
CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_numbers = itertools.count()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class NetworkNamespace:
    """A named network namespace with only loopback up; ``close`` deletes it."""

    def __init__(self) -> None:
        self.name = f"cxrtest-{os.getpid()}-{next(_numbers)}"
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            _ip("netns", "del", self.name)
            raise
        # One thread that lives in the namespace; calls are serialised through it.
        self._inside = ThreadPoolExecutor(1, thread_name_prefix=self.name, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def command(self, argv: Iterable[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the namespace's thread and return (or raise) what it does."""
        return self._inside.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._inside.shutdown(wait=True)
        _ip("netns", "del", self.name)

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Orthanc:
    """Orthanc 1.10 with a throw-away configuration and storage, inside ``ns``.

    ``check_called_aet`` makes Orthanc reject (permanently) an association addressed to another
    AE title. Storage survives ``stop``/``start``, as a real PACS that was down for a while.
    ``dicomweb`` loads the DICOMweb plugin (STOW-RS, QIDO-RS at ``dicomweb_url``); ``users``
    (name: password) turns on HTTP Basic authentication, which the REST helpers here use too.
    """

    AE_TITLE = "ORTHANC"
    DICOM_PORT = 4242  # the namespace is private, so the usual ports never collide
    HTTP_PORT = 8042

    def __init__(self, workdir: Path, ns: NetworkNamespace, check_called_aet: bool = True,
                 dicomweb: bool = False, users: Mapping[str, str] | None = None,
                 **options: object):
        self.workdir = workdir
        self.ns = ns
        self.users = dict(users or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "orthanc.log"
        self.config_path = workdir / "orthanc.json"
        storage = workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({
            "Name": "cxr-node-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            # the Debian package's other plugins (worklists, serve-folders) stay off
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "EnableWado": False},
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.HTTP_PORT,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.AE_TITLE,
            "DicomPort": self.DICOM_PORT,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "DicomScpTimeout": 30,
            "SaveJobs": False,
            "StableAge": 60,
            **options,  # any other Orthanc setting, e.g. Jpeg2000TransferSyntaxAccepted=False
        }, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.HTTP_PORT}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> Orthanc:
        if self.running:
            return self
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.ns.command([ORTHANC, str(self.config_path)]),
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            if self.ns.call(self._answers):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer within {timeout} s:\n{self.log()}")

    def _answers(self) -> bool:
        """REST answers and the DICOM port accepts connections (runs inside the namespace)."""
        try:
            json.loads(self._request("/system", None, timeout=2))
            socket.create_connection(("127.0.0.1", self.DICOM_PORT), timeout=2).close()
        except OSError:
            return False
        return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @contextmanager
    def down(self) -> Iterator[None]:
        """The PACS is switched off inside the block and back on after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- REST, from inside the namespace -----------------------------------------------------

    def get(self, path: str) -> Any:
        return json.loads(self.ns.call(self._request, path, None))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self.ns.call(self._request, path, json.dumps(body).encode()))

    def _request(self, path: str, body: bytes | None, timeout: float = 30) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", data=body,
                                     method="POST" if body else "GET")
        for user, password in list(self.users.items())[:1]:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.read()

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return self.get("/instances")

    def tags(self, instance_id: str, whole: Iterable[str] = ("TextValue",)) -> dict[str, Any]:
        """The instance's dataset as {keyword: value}, strings decoded by Orthanc.

        Orthanc shows values longer than 256 bytes as null unless they are named in
        ``ignore-length``; the ``whole`` attributes (report text by default) come back entire.
        """
        query = urllib.parse.urlencode({"ignore-length": ",".join(whole)})
        return self.get(f"/instances/{urllib.parse.quote(instance_id)}/tags?simplify&{query}")

    def find(self, sop_instance_uid: str) -> list[str]:
        """Orthanc's ids of the instances with this SOP Instance UID (a PACS keeps one)."""
        return self.post("/tools/find", {"Level": "Instance",
                                         "Query": {"SOPInstanceUID": sop_instance_uid}})

    def file(self, instance_id: str) -> bytes:
        """The Part-10 file Orthanc stored for the instance."""
        path = f"/instances/{urllib.parse.quote(instance_id)}/file"
        return self.ns.call(self._request, path, None)

    def study_uid_of(self, instance_id: str) -> str:
        """The Study Instance UID of the study Orthanc filed the instance in."""
        study = self.get(f"/instances/{urllib.parse.quote(instance_id)}/study")
        return study["MainDicomTags"]["StudyInstanceUID"]

    def store(self, files: Iterable[Path], calling_ae: str = "MODALITY1") -> dict[str, str]:
        """Send files with dcmtk's storescu, as a modality would; {file: response}."""
        return storescu(self.DICOM_PORT, files, aet=calling_ae, aec=self.AE_TITLE,
                        netns=self.ns.name)


@contextmanager
def running_orthanc(workdir: Path, check_called_aet: bool = True, dicomweb: bool = False,
                    users: Mapping[str, str] | None = None,
                    **options: object) -> Iterator[Orthanc]:
    """A started Orthanc in a namespace of its own; both are gone after the block."""
    workdir.mkdir(parents=True, exist_ok=True)
    with NetworkNamespace() as ns:
        pacs = Orthanc(workdir, ns, check_called_aet=check_called_aet, dicomweb=dicomweb,
                       users=users, **options)
        try:
            yield pacs.start()
        finally:
            pacs.stop()
