"""DICOMweb STOW-RS to an archive or viewer (``type: dicomweb``): one request per draft.

The renditions the destination names go in one multipart/related request (PS3.18 10.5, parts of
type application/dicom, each file as the node wrote it) to ``{url}/studies``. The target names no
study: each object carries the images' Study Instance UID and is filed in their study, and no
identifier travels in a request line, which proxies and access logs keep. It is sent with
dicomweb-client over requests, tied down: the server's certificate must chain to the CA bundle
named (not the system's, not certifi's) and carry the URL's host; no redirect is followed; nothing
is taken from the environment (proxies, .netrc, CA bundles); an answer is read up to 1 MiB.

What the answer (PS3.18 10.5.3) makes of the draft:

============================== ================================================================
answer                         delivery
============================== ================================================================
2xx, no failed instance        delivered; WarningReasons (or a 202 without any) are the reason
408, 429, 5xx                  retry
2xx, 409 or 4xx that name      each FailureReason read as a C-STORE status (PS3.4 B.2.3): out
failed instances               of resources retried, every other failure dead
401, 403                       dead: the credentials were refused (requeue once fixed)
3xx                            dead: a redirect is not followed (set url to where it points)
any other 4xx                  dead, with what the status means
no connection, timeout, cut    retry
TLS certificate refused        retry, with the verifier's reason
============================== ================================================================

A delivery's status is the DICOM status the server gave (FailureReason, WarningReason; 0x0000 for
success), as for C-STORE; the HTTP status is in the reason. No reason quotes the server's text
(it may name a patient), an instance's UID, or the secret.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from cxr_node import __version__
from cxr_node.config import ConfigError, ConfigPath, _Section, read_secret
from cxr_node.destinations.base import (
    Check,
    Delivery,
    DestinationSettings,
    Draft,
    SendsDicomObjects,
)
from cxr_node.destinations.dicom import describe_certificate, status_meaning, store_status_delivery
from cxr_node.tls import load_cas, load_identity, restrict

CREDENTIAL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
CREDENTIAL_ENV_PREFIX = "CXR_NODE_CREDENTIAL_"
MAX_ANSWER_BYTES = 1 << 20  # a STOW-RS answer lists a few instances: a few KiB
WHOLE_BODY = 1 << 31  # dicomweb-client sends a body larger than its chunk size chunked
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
URL_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
MAX_LISTED = 3  # failed or warned instances named in a reason; the rest are counted
HINTS = {
    401: "the server refused the credentials; check username and credential, then requeue",
    403: "the server refused the credentials the right to store; fix that there, then requeue",
    404: "no STOW-RS service at url/studies; check url",
    405: "the server takes no STOW-RS at url/studies; check url",
    413: "the draft is larger than the server takes",
    415: "the server does not take application/dicom parts",
}


def credential_env(credential: str) -> str:
    """The environment variable that stands in for a systemd credential outside systemd."""
    return CREDENTIAL_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", credential).upper()


def _is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class WebTLSConfig(_Section):
    """HTTPS to a DICOMweb server: its certificate must chain to ``ca_certificates`` and carry the
    URL's host name (or IP address) in its subjectAltName; ours is sent when it asks for one."""

    ca_certificates: ConfigPath = Field(
        description="CA bundle the server's certificate must chain to (the system trust store "
                    "is not used)")
    certificate: ConfigPath | None = Field(
        None, description="client certificate (PEM), for a server that asks for one")
    private_key: ConfigPath | None = Field(
        None, description="its private key (PEM, readable by the node only)")
    private_key_credential: str | None = Field(
        None, pattern=CREDENTIAL_NAME,
        description="systemd credential holding that key (LoadCredential=NAME:private_key); "
                    "read from $CREDENTIALS_DIRECTORY when the service has it")
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="oldest TLS version accepted")

    @model_validator(mode="after")
    def _pair(self) -> WebTLSConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key together, or neither")
        if self.private_key_credential and self.certificate is None:
            raise ValueError("certificate and private_key with private_key_credential")
        return self


class DicomWebDestination(DestinationSettings, SendsDicomObjects):
    """An archive or viewer that takes the drafts by DICOMweb STOW-RS."""

    type: Literal["dicomweb"] = Field("dicomweb", description="DICOMweb STOW-RS")
    url: str = Field(
        max_length=2048,
        description="base URL of the DICOMweb service, such as "
                    "https://pacs.hospital.example/dicom-web (drafts are POSTed to "
                    "url/studies); https, or http to a loopback address only")
    plain_http_on_loopback: bool = Field(
        False, validate_default=True,
        description="true to send in clear to an http:// url on this machine (127.0.0.1, "
                    "::1: a local server or TLS proxy); any other http:// url is refused")
    tls: WebTLSConfig | None = Field(
        None, validate_default=True,
        description="HTTPS to this server, required with an https:// url (see tls.*)")
    authentication: Literal["none", "basic", "bearer"] = Field(
        "none", description="HTTP authentication: none, basic (username and password) or "
                            "bearer (a token)")
    username: str | None = Field(
        None, min_length=1, max_length=128, validate_default=True,
        description="user name for basic authentication")
    credential: str | None = Field(
        None, pattern=CREDENTIAL_NAME, validate_default=True,
        description="name of the systemd credential that holds the password or token "
                    "(LoadCredential=NAME:/etc/cxr-node/NAME); without systemd, the environment "
                    "variable CXR_NODE_CREDENTIAL_<NAME> (upper case, - and . as _)")
    timeout_seconds: float = Field(
        30.0, gt=0, le=3600,
        description="connection timeout, and the longest silence while sending or awaiting the "
                    "answer")
    connections: int = Field(2, ge=1, le=16, description="drafts sent to this server at once")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if re.search(r"[\s\x00-\x1f\x7f]", v):
            raise ValueError("a URL without spaces or control characters")
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http"):
            raise ValueError("an https:// URL, such as https://pacs.hospital.example/dicom-web")
        if "@" in parts.netloc:
            raise ValueError("a URL without user or password: the user is username, the "
                             "password or token comes from the systemd credential named in "
                             "credential")
        if parts.query or parts.fragment or "?" in v or "#" in v:
            raise ValueError("a URL without ?query or #fragment (secrets go in credentials)")
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            raise ValueError("a URL with a numeric port, such as https://pacs:8443/dicom-web"
                             ) from None
        if not parts.hostname:
            raise ValueError("a URL with the server's host, such as "
                             "https://pacs.hospital.example/dicom-web")
        if not URL_PATH.fullmatch(parts.path):
            raise ValueError("a URL path of letters, digits and -._~/ (percent-encode others)")
        if parts.path.rstrip("/").endswith("/studies"):
            raise ValueError("the service's base URL, without /studies (the node adds it)")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("an https:// URL: drafts and credentials never cross a network in "
                             "clear (http:// only to a loopback address such as 127.0.0.1)")
        return v.rstrip("/")

    @field_validator("plain_http_on_loopback")
    @classmethod
    def _plain(cls, v: bool, info: ValidationInfo) -> bool:
        scheme = urlsplit(info.data.get("url", "")).scheme
        if scheme == "http" and not v:
            raise ValueError("true to send in clear to this loopback http:// url, or an "
                             "https:// url")
        if scheme == "https" and v:
            raise ValueError("false (or absent) with an https:// url")
        return v

    @field_validator("tls")
    @classmethod
    def _tls(cls, v: WebTLSConfig | None, info: ValidationInfo) -> WebTLSConfig | None:
        scheme = urlsplit(info.data.get("url", "")).scheme
        if scheme == "https" and v is None:
            raise ValueError("tls with ca_certificates for an https:// url: the server's "
                             "certificate must chain to a CA bundle you name (the system trust "
                             "store is not used)")
        if scheme == "http" and v is not None:
            raise ValueError("an https:// url when tls is set")
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("authentication")
        if method == "basic" and v is None:
            raise ValueError("a user name with authentication: basic")
        if method in ("none", "bearer") and v is not None:
            raise ValueError(f"no username with authentication: {method}")
        if v is not None and (":" in v or CONTROL.search(v)):
            raise ValueError("a user name without ':' or control characters (RFC 7617)")
        return v

    @field_validator("credential")
    @classmethod
    def _credential(cls, v: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("authentication")
        if method in ("basic", "bearer") and v is None:
            raise ValueError(f"the name of the systemd credential holding the "
                             f"{'password' if method == 'basic' else 'token'} (never the "
                             "secret itself)")
        if method == "none" and v is not None:
            raise ValueError("authentication: basic or bearer with a credential")
        return v

    @property
    def lanes(self) -> int:
        return self.connections


class _NotSent(Exception):
    """The request cannot be made as configured; the message says why, with no secret in it."""


class _Unread(Exception):
    """An answer whose body was not read: it was too large."""


class _Bearer(AuthBase):
    """``Authorization: Bearer <token>``; its repr shows no token."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


class _OwnTrust(HTTPAdapter):
    """HTTPS through one SSL context: only its CAs, the URL's host checked. requests would
    otherwise load certifi's public CAs into that context (``cert_verify``)."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, ssl_context=self._context, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"


def web_context(tls: WebTLSConfig) -> ssl.SSLContext:
    """A client context with the node's TLS policy (cxr_node.tls: TLS 1.2 at least, BCP 195
    suites), our CAs alone and our certificate if configured; hostname checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    restrict(ctx, tls)  # type: ignore[arg-type]  (the same fields as TLSConfig)
    load_cas(ctx, tls.ca_certificates)
    if tls.certificate is not None:
        load_identity(ctx, tls)  # type: ignore[arg-type]
    return ctx


class _BoundedBody:
    """An answer's body as requests reads it, cut off past ``limit`` bytes (decoded, so a
    compressed answer cannot expand past it either): a server cannot make the node hold more."""

    def __init__(self, raw: Any, limit: int):
        self._raw, self._limit = raw, limit

    def stream(self, amt: int, decode_content: bool | None = None) -> Iterator[bytes]:
        seen = 0
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            seen += len(chunk)
            if seen > self._limit:
                raise _Unread(f"its answer was not read: over {self._limit >> 20} MiB")
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@dataclass
class _Exchange:
    """One request to the server and what came back: the answer (its body bounded), the
    server's certificate, why the body was not read."""

    session: requests.Session
    client: DICOMwebClient
    response: requests.Response | None = None
    returned: Any = None
    certificate: dict[str, Any] | None = None
    unread: str | None = None

    def keep(self, response: requests.Response, **_: Any) -> requests.Response:
        self.response = response
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        if isinstance(sock, ssl.SSLSocket):
            self.certificate = sock.getpeercert()
        length = response.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_ANSWER_BYTES:
            raise _Unread(f"its answer was not read: over {MAX_ANSWER_BYTES >> 20} MiB")
        response.raw = _BoundedBody(response.raw, MAX_ANSWER_BYTES)
        return response

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    def body(self) -> dict[str, Any] | None:
        """The answer's dataset in DICOM JSON (PS3.18 F.2), if it has one: as dicomweb-client
        read it (JSON or XML, by its media type), else the body read as JSON whatever its type.
        Left as JSON, so that one malformed element does not hide the others."""
        try:
            if isinstance(self.returned, Dataset) and len(self.returned):
                return self.returned.to_json_dict()
            if self.response is None or self.unread:
                return None
            data = json.loads(self.response.content)
        except Exception:  # a server's bytes: anything may be wrong with them
            return None
        return data if isinstance(data, dict) else None


class DicomWebStore:
    """STOW-RS client of one DICOMweb server: one request per draft, its answer classified."""

    def __init__(self, destination: DicomWebDestination, node_ae_title: str = ""):
        self.name = destination.name
        self.destination = destination
        parts = urlsplit(destination.url)
        self.netloc = parts.netloc  # what the Host header says
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        self.host = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        if destination.tls is not None:
            web_context(destination.tls)  # a TLS file it cannot read stops the node at start

    @property
    def peer(self) -> str:
        return self.destination.url  # validated: no user, password or query in it

    def send(self, draft: Draft) -> Delivery:
        documents = self.destination.documents_of(draft)
        datasets = [pydicom.dcmread(path) for _, path in documents]
        ours = {str(ds.SOPInstanceUID): rendition
                for (rendition, _), ds in zip(documents, datasets, strict=True)}
        exchange, failed = self._request(lambda client: client.store_instances(datasets))
        if failed is not None:
            return failed
        assert exchange is not None
        return stow_delivery(exchange.status, exchange.body(), ours, exchange.unread)

    def check(self) -> Iterator[Check]:
        """A QIDO-RS query for a study that cannot exist: proves the URL, the TLS chain and name
        and that the server takes the credentials, and stores nothing. Whether they may store
        shows at the first delivery."""
        started = time.monotonic()
        where = f"QIDO-RS {self.peer}/studies"
        exchange, failed = self._request(lambda client: client.search_for_studies(
            search_filters={"StudyInstanceUID": generate_uid()}, limit=1))
        if failed is not None:
            yield Check(False, f"{where}: FAILED: {failed.reason}")
            return
        assert exchange is not None
        took = f"{(time.monotonic() - started) * 1000:.0f} ms"
        certificate = (f"; {describe_certificate(exchange.certificate)}"
                       if self.destination.tls else "")
        said = http_status(exchange.status)
        if 200 <= exchange.status < 300:
            proven = ["URL", *(["TLS"] if self.destination.tls else []),
                      *(["credentials"] if self.destination.authentication != "none" else [])]
            accepted = " and ".join(filter(None, [", ".join(proven[:-1]), proven[-1]]))
            yield Check(True, f"{where}: {said} in {took}: {accepted} accepted{certificate}")
            return
        hint = HINTS.get(exchange.status, "")
        if exchange.status in (404, 405):
            hint = "no QIDO-RS at url/studies (a server that takes STOW-RS only answers so)"
        yield Check(False, f"{where}: FAILED: {said}{f': {hint}' if hint else ''}{certificate}")

    def _request(self, call: Callable[[DICOMwebClient], Any]
                 ) -> tuple[_Exchange | None, Delivery | None]:
        """Make one request; the exchange when an answer came, else why none did (a delivery)."""
        try:
            exchange = self._open()
        except _NotSent as exc:
            return None, Delivery.dead(str(exc))
        except ConfigError as exc:  # a TLS file that cannot be read, perhaps only for now
            return None, Delivery.retry(f"TLS files: {exc}")
        try:
            exchange.returned = call(exchange.client)
        except requests.exceptions.SSLError as exc:
            return None, Delivery.retry(self._tls_failure(exc))
        except requests.Timeout:
            return None, Delivery.retry(f"no answer from {self.peer} within "
                                        f"{self.destination.timeout_seconds:g} s")
        except requests.ConnectionError as exc:
            return None, Delivery.retry(f"no answer from {self.peer}: {_why(exc)}")
        except (requests.HTTPError, requests.TooManyRedirects, requests.JSONDecodeError):
            pass  # an answer: its status says what it means (and its body, if readable)
        except _Unread as exc:
            exchange.unread = str(exc)
        except requests.RequestException as exc:
            return None, Delivery.retry(f"the answer of {self.peer} was cut off: {_why(exc)}")
        except Exception:
            if exchange.response is None:
                raise
            # dicomweb-client could not read the answer's body: its status stands
        finally:
            if exchange.response is not None:
                exchange.response.close()  # a connection whose answer was not read to the end
            exchange.session.close()
        if exchange.response is None:
            return None, Delivery.retry(f"no answer from {self.peer}")
        return exchange, None

    def _open(self) -> _Exchange:
        """A session for one request: our TLS context and secret; no redirect followed; nothing
        from the environment (proxies, .netrc, CA bundles); the answer kept, bounded."""
        d = self.destination
        session = requests.Session()
        session.trust_env = False
        session.max_redirects = 0  # a redirect is an answer, not an order
        session.auth = self._auth()
        session.headers["Accept"] = "application/dicom+json"
        session.headers["User-Agent"] = f"cxr-node/{__version__}"  # for the server's own log
        if d.tls is not None:
            session.mount("https://", _OwnTrust(web_context(d.tls)))
        client = DICOMwebClient(d.url, session=session, timeout=d.timeout_seconds,
                                chunk_size=WHOLE_BODY)
        client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff
        client.host = self.netloc  # it sends the host without the port otherwise
        exchange = _Exchange(session, client)
        session.hooks["response"] = [exchange.keep]
        return exchange

    def _auth(self) -> AuthBase | None:
        d = self.destination
        if d.authentication == "none" or d.credential is None:
            return None
        env = credential_env(d.credential)
        secret = read_secret(d.credential, env)
        what = "password" if d.authentication == "basic" else "bearer token"
        if not secret:
            raise _NotSent(f"authentication: no {what}: neither the systemd credential "
                           f"'{d.credential}' ($CREDENTIALS_DIRECTORY) nor ${env} is set")
        if d.authentication == "basic":
            if CONTROL.search(secret) or len(secret) > 1024:
                raise _NotSent(f"authentication: the password in credential '{d.credential}' "
                               "has control characters or is over 1024 characters")
            assert d.username is not None
            return HTTPBasicAuth(d.username.encode(), secret.encode())  # type: ignore[arg-type]
        if not BEARER_TOKEN.fullmatch(secret) or len(secret) > 16384:
            raise _NotSent(f"authentication: the token in credential '{d.credential}' is not a "
                           "bearer token (RFC 6750: letters, digits, -._~+/ then =)")
        return _Bearer(secret)

    def _tls_failure(self, exc: BaseException) -> str:
        for cause in _causes(exc):
            if isinstance(cause, ssl.SSLCertVerificationError):
                why = getattr(cause, "verify_message", None) or str(cause)
                return f"TLS: the certificate of {self.host} was refused: {why}"
        reason = next((c.reason or c.strerror for c in _causes(exc)
                       if isinstance(c, ssl.SSLError) and (c.reason or c.strerror)), None)
        return f"TLS: the handshake with {self.host} failed: {reason or 'no reason given'}"


def http_status(status: int) -> str:
    """'HTTP 409 Conflict': the status and what HTTP names it (never the server's own words)."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def stow_delivery(status: int, answer: Mapping[str, Any] | None, ours: Mapping[str, str],
                  unread: str | None = None) -> Delivery:
    """A STOW-RS answer (PS3.18 10.5.3) as a delivery: its HTTP status, and the failures and
    warnings its dataset names for the instances we sent (``ours``: UID -> rendition)."""
    said = http_status(status)
    failures = _listed(answer, "FailedSOPSequence", "FailureReason", ours)
    if unread:
        said = f"{said}; {unread}"
    if 200 <= status < 300 and not failures:
        warnings = _listed(answer, "ReferencedSOPSequence", "WarningReason", ours)
        top = _code(_first(answer or {}, "WarningReason"))
        if top is not None:
            warnings.append(("the request", top))
        if warnings:
            code = next((c for _, c in warnings if c is not None), None)
            return Delivery.delivered(code, f"{said}: {_describe(warnings, 'WarningReason')}")
        if status == 202 or unread:
            return Delivery.delivered(reason=f"{said}: stored, with warnings it did not detail"
                                      if status == 202 else said)
        return Delivery.delivered(0x0000)
    detail = f": {_describe(failures, 'FailureReason')}" if failures else ""
    if status in (408, 429) or status >= 500:
        return Delivery.retry(f"{said}{detail}")
    if failures:
        outcomes = [_failure_outcome(code) for _, code in failures]
        outcome = "dead" if "dead" in outcomes else "retry"
        code = next((c for (_, c), o in zip(failures, outcomes, strict=True)
                     if o == outcome and c is not None), None)
        return Delivery(outcome, f"{said}{detail}", code)
    if 300 <= status < 400:
        return Delivery.dead(f"{said}: a redirect is not followed; set url to where the server "
                             "points")
    hint = HINTS.get(status)
    return Delivery.dead(f"{said}{f': {hint}' if hint else ''}")


def _values(dataset: Mapping[str, Any], keyword: str) -> list[Any]:
    """The values of an attribute of a DICOM JSON dataset; none when it is absent or malformed."""
    element = dataset.get(f"{tag_for_keyword(keyword):08X}")
    values = element.get("Value") if isinstance(element, Mapping) else None
    return values if isinstance(values, list) else []


def _first(dataset: Mapping[str, Any], keyword: str) -> Any:
    return next(iter(_values(dataset, keyword)), None)


def _code(value: Any) -> int | None:
    """A status code (US), if ``value`` is one."""
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _listed(answer: Mapping[str, Any] | None, sequence: str, reason: str,
            ours: Mapping[str, str]) -> list[tuple[str, int | None]]:
    """(rendition, reason code) of each item of ``sequence`` that names one of our instances
    with a reason; for failures, also each item that names none of them (a failure all the
    same: only ours were sent)."""
    found: list[tuple[str, int | None]] = []
    for item in _values(answer or {}, sequence):
        if not isinstance(item, Mapping):
            item = {}
        code = _code(_first(item, reason))
        if reason == "WarningReason" and code is None:
            continue
        uid = _first(item, "ReferencedSOPInstanceUID")
        if isinstance(uid, str) and uid in ours:
            found.append((ours[uid], code))
        elif reason == "FailureReason":
            found.append(("an unidentified instance", code))
    return found


def _describe(listed: list[tuple[str, int | None]], reason: str) -> str:
    """'sr: FailureReason 0xC000 (Cannot Understand); pdf: ...' for the first few."""
    parts = [f"{label}: {reason} 0x{code:04X} ({status_meaning(code)})" if code is not None
             else f"{label}: no {reason} given" for label, code in listed[:MAX_LISTED]]
    if len(listed) > MAX_LISTED:
        parts.append(f"and {len(listed) - MAX_LISTED} more")
    return "; ".join(parts)


def _failure_outcome(code: int | None) -> Literal["retry", "dead"]:
    """A FailureReason read as the C-STORE status it is; one that says no failure is still one."""
    if code is None:
        return "dead"
    outcome = store_status_delivery(code).outcome
    return "retry" if outcome == "retry" else "dead"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it wraps (requests wraps urllib3's, which wraps ssl's)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 32:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [c for c in (current.__cause__, current.__context__,
                             getattr(current, "reason", None), *current.args)
                 if isinstance(c, BaseException)]


def _why(exc: BaseException) -> str:
    """What the operating system said went wrong with the connection, in its own words."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return "the connection was closed without an answer"
