"""DICOM TLS (PS3.15 Annex B.1): SSL contexts for the Storage SCP and for sending to the PACS.

Policy, the same for both directions:

- TLS 1.2 at least (``minimum_version: TLSv1.3`` where every peer has it). TLS 1.2 is limited to
  the forward-secret AEAD suites of BCP 195 (RFC 9325), which dcmtk's default "BCP 195
  non-downgrading" profile and current PACS speak; TLS 1.3 suites are all AEAD already.
- Receiver: with ``require_client_certificate`` a peer must present a certificate that chains to
  ``ca_certificates`` or the handshake fails (CERT_REQUIRED); with ``ca_certificates`` alone a
  presented certificate must chain, none is accepted; without it, TLS only encrypts and the
  accept rules (AE title + network) are the access control.
- Sender: the PACS's certificate must chain to ``ca_certificates``, which is required (the system
  trust store would let any holder of a public certificate pose as the PACS), *and* be the PACS's:
  its subjectAltName must carry ``server_name`` (default: the destination's host, DNS name or IP
  address), or, for a PACS whose certificate names neither, its SHA-256 fingerprint must be one of
  ``pinned_sha256``. A CA alone is not an identity: hospital CAs issue certificates to modalities
  too, and any of them would otherwise pass as the PACS. Give the sender a bundle with only the
  CAs that issue PACS certificates as well.
- The private key is read from systemd's credential directory when the unit loads it
  (``LoadCredential=NAME:/etc/cxr-node/tls/node.key`` with ``private_key_credential: NAME``), so
  the key file itself can stay readable by root only; otherwise from ``private_key``.

Every problem with the files is a ConfigError naming the file and what is wrong, raised at start.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

from cxr_node.config import (
    Config,
    ConfigError,
    DestinationTLSConfig,
    TLSConfig,
)

# BCP 195 / RFC 9325 section 4.2, in OpenSSL's notation: ECDHE or DHE key exchange, AES-GCM or
# ChaCha20-Poly1305; never RSA key exchange, CBC, SHA-1 MACs or anonymous suites.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
# What the OpenSSL reasons seen most at a receiver mean, for whoever reads the log.
HANDSHAKE_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate does not chain to ca_certificates",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (plain DICOM on the TLS port?)",
    "HTTP_REQUEST": "the peer speaks HTTP, not DICOM over TLS",
    "UNSUPPORTED_PROTOCOL": "the peer offers only TLS versions below minimum_version",
    "NO_SHARED_CIPHER": "no cipher suite in common (BCP 195 suites only)",
}


def _version(name: str) -> ssl.TLSVersion:
    return ssl.TLSVersion[name.replace(".", "_")]


def private_key_path(tls: TLSConfig) -> Path:
    """The key file to read: systemd's copy of the credential when the service has one."""
    directory = os.environ.get(CREDENTIALS_ENV)
    if tls.private_key_credential and directory:
        credential = Path(directory) / tls.private_key_credential
        if credential.is_file():
            return credential
    return tls.private_key


def _readable(path: Path, what: str, hint: str = "") -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the {what} ({exc.strerror}){hint}"]) from None


def load_identity(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    """Our certificate chain and key, with a message that says which file is wrong and how."""
    key = private_key_path(tls)
    hint = ""
    if tls.private_key_credential and key == tls.private_key:
        hint = (f"; nor is there a systemd credential '{tls.private_key_credential}' "
                f"in ${CREDENTIALS_ENV}")
    _readable(tls.certificate, "certificate")
    _readable(key, "private key", hint)

    def encrypted() -> bytes:  # OpenSSL would otherwise prompt on a terminal nobody watches
        raise ConfigError([f"{key}: the private key is encrypted; the node needs it unencrypted, "
                           "kept private by its file mode or a systemd credential"])

    try:
        ctx.load_cert_chain(tls.certificate, key, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"{key}: this private key does not belong to the certificate {tls.certificate}"
        else:
            problem = (f"{tls.certificate} and {key}: not a PEM certificate chain and its private "
                       f"key ({exc.reason or exc})")
        raise ConfigError([problem]) from None


def load_cas(ctx: ssl.SSLContext, bundle: Path) -> None:
    _readable(bundle, "CA certificates")
    try:
        ctx.load_verify_locations(cafile=bundle)
    except ssl.SSLError as exc:
        raise ConfigError([f"{bundle}: no PEM CA certificate in it ({exc.reason or exc})"]) from None


def restrict(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    ctx.minimum_version = _version(tls.minimum_version)
    ctx.set_ciphers(TLS12_CIPHERS)


def server_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The receiver's context; with require_client_certificate, peers must present a trusted one."""
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    restrict(ctx, tls)
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a client could otherwise make us redo handshakes
    load_identity(ctx, tls)
    if tls.ca_certificates:
        load_cas(ctx, tls.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


class PeerCheckingContext(ssl.SSLContext):
    """A client context for one connection that also checks a pinned certificate, and keeps the
    peer's certificate or the reason it was refused, for the delivery's reason and for
    ``config check --connect``."""

    pinned_sha256: frozenset[str] = frozenset()
    failure: str | None = None
    peer_certificate: dict[str, object] | None = None


class _VerifiedSocket(ssl.SSLSocket):
    """Checks the pin right after the handshake, before a single DICOM byte is sent."""

    def connect(self, address: object) -> None:  # type: ignore[override]
        context = self.context
        assert isinstance(context, PeerCheckingContext)
        try:
            super().connect(address)
            certificate = self.getpeercert(binary_form=True) or b""
            fingerprint = hashlib.sha256(certificate).hexdigest()
            if context.pinned_sha256 and fingerprint not in context.pinned_sha256:
                raise ssl.SSLCertVerificationError(
                    f"certificate sha256 {fingerprint} is not one of tls.pinned_sha256")
        except ssl.SSLCertVerificationError as exc:
            context.failure = getattr(exc, "verify_message", None) or str(exc)
            raise
        except ssl.SSLError as exc:
            context.failure = exc.reason or str(exc)
            raise
        context.peer_certificate = self.getpeercert()


def client_context(tls: DestinationTLSConfig | None) -> PeerCheckingContext | None:
    """A context for one connection to a destination: the PACS certificate must chain to our CAs
    and carry the expected name, or match a pinned fingerprint (then the name is not checked).

    Build one per connection: it records that connection's outcome.
    """
    if tls is None:
        return None
    if tls.ca_certificates is None:
        raise ConfigError([
            f"destination TLS with certificate {tls.certificate} has no ca_certificates: the "
            "PACS's certificate must chain to a CA bundle you name (the system store is not used)"
        ])
    ctx = PeerCheckingContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED
    ctx.sslsocket_class = _VerifiedSocket
    ctx.pinned_sha256 = frozenset(tls.pinned_sha256)
    ctx.check_hostname = not tls.pinned_sha256
    restrict(ctx, tls)
    load_cas(ctx, tls.ca_certificates)
    if tls.certificate is not None:  # optional where the peer asks for none (an HL7 receiver)
        load_identity(ctx, tls)
    return ctx


def complete_handshake(sock: ssl.SSLSocket, timeout: float) -> str | None:
    """Finish a server-side handshake within ``timeout``; None, or why it failed (for the log).

    The socket is left blocking (no timeout), as pynetdicom expects its sockets to be.
    """
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except ssl.SSLError as exc:
        reason = exc.reason or exc.strerror or type(exc).__name__
        hint = HANDSHAKE_HINTS.get(reason)
        return f"TLS handshake failed: {reason}" + (f" ({hint})" if hint else "")
    except TimeoutError:
        return f"no TLS handshake within {timeout:g} s"
    except OSError as exc:
        return f"connection lost during the TLS handshake: {exc.strerror or type(exc).__name__}"
    sock.settimeout(None)
    return None


def check_tls_files(config: Config) -> None:
    """Load every certificate and key the node will use, so a bad file stops it at start."""
    server_context(config.node.tls)
    for destination in config.destinations:
        tls = getattr(destination, "tls", None)
        if isinstance(tls, DestinationTLSConfig):
            client_context(tls)
