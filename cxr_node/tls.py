"""DICOM TLS (PS3.15 Annex B): SSL contexts for the Storage SCP and for sending to the PACS."""

from __future__ import annotations

import ssl

from cxr_node.config import TLSConfig


def _version(name: str) -> ssl.TLSVersion:
    return ssl.TLSVersion[name.replace(".", "_")]


def server_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The receiver's context; with require_client_certificate, peers must present a trusted one."""
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(tls.minimum_version)
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(tls.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The context for sending to a destination: the PACS certificate must chain to our CAs."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    ctx.minimum_version = _version(tls.minimum_version)
    ctx.check_hostname = False  # PACS peers are addressed by IP and identified by certificate
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    return ctx
