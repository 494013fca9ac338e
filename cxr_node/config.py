"""The node's configuration: YAML files validated once, at start-up.

An unknown key or a bad value stops the node with one message per problem naming the file, the
line, the key, the value found and what is expected, so hospital IT can fix it without reading code.
Secrets never live in the YAML: they come from the environment or from files (systemd credentials).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cxr_node.identity import ModelIdentity

DEFAULT_CONFIG_PATH = Path("/etc/cxr-node/cxr-node.yaml")
CONFIG_ENV = "CXR_NODE_CONFIG"

# Environment variables that override a path or carry a secret; nothing else is read from the env.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "CXR_NODE_STATE_DIR": ("node", "state_dir"),
    "CXR_NODE_MODEL_PATH": ("model", "path"),
    "CXR_NODE_ADAPTER_PATH": ("model", "adapter"),
    "CXR_NODE_BROKER_URL": ("queue", "broker"),
}
BROKER_PASSWORD_ENV = "CXR_NODE_BROKER_PASSWORD"
BROKER_PASSWORD_CREDENTIAL = "broker-password"
WORKER_BROKER_PASSWORD_ENV = "CXR_NODE_WORKER_BROKER_PASSWORD"
WORKER_BROKER_PASSWORD_CREDENTIAL = "worker-broker-password"
REDIS_USER_RE = r"^[A-Za-z0-9_.-]{1,64}$"

RESULT_GRACE_SECONDS = 30
"""Slack after a task's latest possible end (a hard kill, clocks of node and workers apart)."""

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash
# P-DATA PDU sizes (PS3.8 D.1 maximum length): dcmtk's default and its largest are 16 and 128 KiB.
MIN_PDU_BYTES, DEFAULT_PDU_BYTES, MAX_PDU_BYTES = 4096, 128 << 10, 4 << 20
# Certificate subject attributes an accept rule may name, as OpenSSL abbreviates them.
CERT_ATTRIBUTES = {"CN": "commonName", "O": "organizationName", "OU": "organizationalUnitName",
                   "C": "countryName", "L": "localityName", "ST": "stateOrProvinceName",
                   "DC": "domainComponent", "emailAddress": "emailAddress",
                   "serialNumber": "serialNumber", "UID": "userId"}


class ConfigError(Exception):
    """The configuration cannot be used; the message is meant for the person who wrote it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    if not isinstance(value, str) or not AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError("an AE title: 1 to 16 printable ASCII characters, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Relative paths in a file are relative to that file, not to wherever the node was started."""
    base = (info.context or {}).get("base")
    return (base / value).resolve() if base and not value.is_absolute() else value


ConfigPath = Annotated[Path, AfterValidator(_resolve)]


class TLSConfig(_Section):
    """DICOM TLS (PS3.15 B.1). Files are PEM; the private key is a secret path, not a secret value."""

    certificate: ConfigPath = Field(description="this node's certificate chain (PEM)")
    private_key: ConfigPath = Field(description="its private key (PEM, readable by the node only)")
    private_key_credential: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="systemd credential holding the key (LoadCredential=NAME:private_key); "
                    "read from $CREDENTIALS_DIRECTORY when the service has it")
    ca_certificates: ConfigPath | None = Field(
        None, description="CA bundle that peer certificates must chain to"
    )
    require_client_certificate: bool = Field(
        False, description="receiver: refuse peers without a certificate from ca_certificates")
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TLSConfig:
        if self.require_client_certificate and not self.ca_certificates:
            raise ValueError("ca_certificates, to check client certificates against")
        return self


class NodeConfig(_Section):
    ae_title: AETitle = Field("CXR_NODE", description="called AE title modalities send to")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every address)")
    port: int = Field(11112, ge=1, le=65535, description="DICOM port")
    state_dir: ConfigPath = Field(Path("/var/lib/cxr-node"),
                                  description="everything the node writes lives here")
    max_associations: int = Field(
        16, ge=1, le=512, description="concurrent incoming associations, all receivers together")
    min_free_disk_mb: int = Field(
        2048, ge=0, description="below this free space, C-STORE answers 0xA700 (retry later)")
    receivers: int = Field(4, ge=1, le=64, description=(
        "receiver processes sharing the port (the GIL: more processes than cores still helps)"))
    fsync: bool = Field(True, description="fsync each instance before answering success")
    max_pdu_bytes: int = Field(
        DEFAULT_PDU_BYTES, ge=0, le=MAX_PDU_BYTES, description=(
            "largest P-DATA PDU announced to senders, 4096 to 4194304 (0: the largest, 4 MiB; "
            "never unlimited); a peer that sends a larger PDU is aborted"))
    max_pending_connections: int = Field(
        64, ge=1, le=4096, description=(
            "connections not past the accept rules yet (TLS handshake or association request "
            "under way), all receivers together; a new one over this is closed at once"))
    max_pending_per_source: int = Field(
        8, ge=1, le=4096, description=(
            "the same, from one IP address: a peer holding idle connections cannot lock "
            "out the others"))
    acse_timeout_seconds: float = Field(
        10.0, gt=0, description="wait this long for a peer's association request or release")
    network_timeout_seconds: float = Field(
        60.0, gt=0, description="a silent association is closed after this")
    tls: TLSConfig | None = Field(None, description="DICOM TLS for the receiver (see tls.*)")

    @field_validator("max_pdu_bytes")
    @classmethod
    def _pdu(cls, v: int) -> int:
        if v == 0:
            return MAX_PDU_BYTES
        if v < MIN_PDU_BYTES:
            raise ValueError(f"0 or a PDU size from {MIN_PDU_BYTES} to {MAX_PDU_BYTES} bytes")
        return v

    @model_validator(mode="after")
    def _pending(self) -> NodeConfig:
        if self.max_pending_per_source > self.max_pending_connections:
            raise ValueError("max_pending_per_source must be at most max_pending_connections")
        return self

    @field_validator("host")
    @classmethod
    def _ip_address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("an IP address to listen on, such as 127.0.0.1 or 0.0.0.0") from None
        return v


class AcceptRule(_Section):
    """One calling AE title allowed from one network (and with one TLS client certificate, if
    given); all must match."""

    ae_title: str = Field(description='calling AE title, or "*" for any')
    network: str = Field(description='peer network such as 10.0.0.0/24, or "*" for any')
    certificate_subject: str | None = Field(
        None, description=(
            'TLS client certificate subject attributes the peer must have, such as '
            '"CN=CR_ED_1,O=Hospital" (checked against the certificate verified with '
            'node.tls.ca_certificates; every attribute named must match)'))

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v if v == "*" else _ae_title(v)

    @field_validator("network")
    @classmethod
    def _net(cls, v: str) -> str:
        if v == "*":
            return v
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError('an IP network such as 10.0.0.0/24 or 127.0.0.1/32, or "*"') from None

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is None:
            return None
        return ",".join(f"{k}={val}".replace(",", "\\,") for k, val in _subject_pairs(v))

    def admits_address(self, address: str) -> bool:
        """Whether a peer at ``address`` could pass this rule with the right AE title."""
        if self.network == "*":
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.network)
        except ValueError:
            return False

    def allows(self, ae_title: str, address: str) -> bool:
        if self.ae_title != "*" and self.ae_title != ae_title.strip():
            return False
        return self.admits_address(address)

    def allows_certificate(self, subject: tuple[tuple[tuple[str, str], ...], ...] | None) -> bool:
        """Whether a peer certificate's subject (as ``ssl.SSLSocket.getpeercert`` gives it; None
        when there is no verified certificate) satisfies ``certificate_subject``."""
        if self.certificate_subject is None:
            return True
        held = {pair for rdn in subject or () for pair in rdn}
        wanted = {(CERT_ATTRIBUTES[k], v) for k, v in _subject_pairs(self.certificate_subject)}
        return subject is not None and wanted <= held


def _subject_pairs(text: str) -> list[tuple[str, str]]:
    """``CN=a,O=b`` as [("CN", "a"), ("O", "b")]; a comma inside a value is written ``\\,``."""
    pairs = []
    for part in re.split(r"(?<!\\),", text):
        key, sep, value = part.partition("=")
        key = {k.lower(): k for k in CERT_ATTRIBUTES}.get(key.strip().lower(), "")
        value = value.strip().replace("\\,", ",")
        if not sep or not key or not value:
            raise ValueError(
                "subject attributes such as CN=CR_ED_1,O=Hospital (attributes: "
                f"{', '.join(CERT_ATTRIBUTES)})")
        pairs.append((key, value))
    return pairs


class RoutingRules(_Section):
    """Which instances a draft may be made from; "" matches an absent or empty attribute."""

    modalities: list[str] = Field(["CR", "DX"], description="Modality values to draft")
    body_parts: list[str] = Field(["CHEST", ""],
                                  description='BodyPartExamined values ("" = absent)')
    view_positions: list[str] = Field(["PA", "AP", "LL", "RL", "LATERAL", ""],
                                      description='ViewPosition values ("" = absent)')

    @field_validator("modalities", "body_parts", "view_positions")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v]


class StudyConfig(_Section):
    settle_seconds: float = Field(30.0, ge=0, description="quiet time after which a study is complete")
    max_wait_seconds: float = Field(
        900.0, gt=0, description="draft a study that keeps receiving after this long anyway")
    rules: RoutingRules = RoutingRules()

    @model_validator(mode="after")
    def _order(self) -> StudyConfig:
        if self.max_wait_seconds < self.settle_seconds:
            raise ValueError("max_wait_seconds must be at least settle_seconds")
        return self


class BrokerTLSConfig(_Section):
    """TLS to Redis: the server's certificate must chain to a CA bundle you name and carry the
    broker URL's host name (or IP address) in its subjectAltName."""

    ca_certificates: ConfigPath = Field(
        description="CA bundle the Redis server's certificate must chain to")
    certificate: ConfigPath | None = Field(
        None, description="client certificate (PEM), when Redis requires one")
    private_key: ConfigPath | None = Field(None, description="its private key (PEM)")

    @model_validator(mode="after")
    def _pair(self) -> BrokerTLSConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key together, or neither")
        return self


class QueueConfig(_Section):
    """How the node hands studies to GPU workers (Celery)."""

    broker: str = Field(
        "embedded",
        description='"embedded" (a folder under state_dir, no server), redis://host:port/db, '
                    'or rediss://host:port/db (TLS, see queue.tls)',
    )
    username: str | None = Field(
        None, pattern=REDIS_USER_RE,
        description="Redis ACL user of the node (password: credential broker-password)")
    worker_username: str | None = Field(
        None, pattern=REDIS_USER_RE,
        description="Redis ACL user of the workers, not the node's "
                    "(password: credential worker-broker-password)")
    tls: BrokerTLSConfig | None = Field(
        None, description="TLS to Redis, required with rediss:// (see queue.tls.*)")
    name: str = Field("cxr.draft", description="Celery queue the workers consume")
    local_worker: bool | None = Field(
        None, description="serve also runs a worker; default: yes with the embedded broker"
    )
    max_in_flight: int = Field(1, ge=1, description="draft tasks outstanding at once")
    batch_size: int = Field(4, ge=1, le=64, description="studies per task (one generate call)")
    task_time_limit_seconds: int = Field(600, ge=10, description="a draft task is killed after this")
    visibility_timeout_seconds: int = Field(
        3600, ge=60, description="Redis re-delivers an unacknowledged task after this")
    start_timeout_seconds: int = Field(
        300, ge=1, description=(
            "a draft task no worker has started within this (waiting in the queue, or "
            "redelivered after its worker died) is discarded by the worker and submitted again"))
    result_timeout_seconds: int | None = Field(
        None, description=(
            "submit a task with no result again after this; at least start_timeout_seconds + "
            "task_time_limit_seconds + 30 (the default), so an attempt that may still run is "
            "never doubled"))
    max_attempts: int = Field(
        3, ge=1, description=(
            "runs of one study's draft before it fails; the node submits again, workers never "
            "retry on their own"))
    retry_delay_seconds: float = Field(
        5.0, ge=0, le=3600, description=(
            "wait before a failed or lost draft is submitted again; doubles with each attempt, "
            "at most 300 s"))
    poll_interval_seconds: float = Field(
        0.05, gt=0, le=5, description=(
            "how often idle stages look for work (results while a draft is out, and the embedded "
            "broker's worker: every 0.02 s at most)"))

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        if v == "embedded":
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError('"embedded" or a redis:// or rediss:// URL')
        if "@" in parts.netloc:
            raise ValueError(
                "a URL without user or password: the users are queue.username and "
                f"queue.worker_username, the passwords come from ${BROKER_PASSWORD_ENV} or the "
                f"systemd credential '{BROKER_PASSWORD_CREDENTIAL}' (and "
                f"${WORKER_BROKER_PASSWORD_ENV} / '{WORKER_BROKER_PASSWORD_CREDENTIAL}')"
            )
        if parts.query or parts.fragment or "?" in v:
            raise ValueError(
                "a URL without ?options: TLS settings go in queue.tls, secrets in credentials")
        if not re.fullmatch(r"/?|/[0-9]{1,2}", parts.path):
            raise ValueError("a URL whose path is the database number, such as redis://host:6379/0")
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            raise ValueError("a URL with a numeric port, such as redis://host:6379/0") from None
        if not parts.hostname:
            raise ValueError("a URL with the Redis host, such as redis://10.0.0.5:6379/0")
        return v

    @model_validator(mode="after")
    def _redis_security(self) -> QueueConfig:
        if self.embedded:
            return self
        if self.broker.startswith("rediss://") and self.tls is None:
            raise ValueError("queue.tls with ca_certificates for a rediss:// broker: the Redis "
                             "server's certificate must chain to a CA bundle you name")
        if self.broker.startswith("redis://") and self.tls is not None:
            raise ValueError("a rediss:// broker URL when queue.tls is set")
        if not self.username or not self.worker_username:
            raise ValueError(
                "queue.username and queue.worker_username with a Redis broker: the node and the "
                "workers each log in as their own Redis ACL user (docs/operations.md)")
        if self.username == self.worker_username:
            raise ValueError("queue.worker_username different from queue.username, so that a "
                             "worker host's password never grants the node's access")
        return self

    @model_validator(mode="after")
    def _timeouts(self) -> QueueConfig:
        if self.visibility_timeout_seconds <= self.task_time_limit_seconds:
            raise ValueError(
                "visibility_timeout_seconds must be longer than task_time_limit_seconds, "
                "or Redis hands a running draft to a second worker"
            )
        if (self.result_timeout_seconds is not None
                and self.result_timeout_seconds < self.shortest_result_timeout):
            raise ValueError(
                f"result_timeout_seconds must be at least start_timeout_seconds + "
                f"task_time_limit_seconds + {RESULT_GRACE_SECONDS} "
                f"(= {self.shortest_result_timeout}), or a draft that may still be running is "
                "submitted a second time"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.broker == "embedded"

    @property
    def runs_local_worker(self) -> bool:
        return self.embedded if self.local_worker is None else self.local_worker

    @property
    def effective_result_timeout(self) -> int:
        return self.result_timeout_seconds or self.shortest_result_timeout

    @property
    def shortest_result_timeout(self) -> int:
        """The latest an attempt can still end: start window, then the hard time limit."""
        return self.start_timeout_seconds + self.task_time_limit_seconds + RESULT_GRACE_SECONDS


class GenerationConfig(_Section):
    max_new_tokens: int = Field(256, ge=1, le=4096, description="longest draft, in tokens")
    min_new_tokens: int = Field(0, ge=0, description="shortest draft, in tokens")
    num_beams: int = Field(1, ge=1, le=16, description="beam search width (1 = greedy)")
    do_sample: bool = Field(False, description="sampling (off: the same images give the same text)")
    temperature: float = Field(1.0, gt=0, description="only with do_sample")
    top_p: float = Field(1.0, gt=0, le=1, description="only with do_sample")
    repetition_penalty: float = Field(1.1, ge=1.0, description="repetition guard (1.0 = off)")
    no_repeat_ngram_size: int = Field(6, ge=0, description="no n-gram of this size twice (0 = off)")


DEFAULT_PROMPT = (
    "You are a radiologist. Write the report of this chest X-ray study ({views}). "
    "{indication}Answer with two sections, FINDINGS: and IMPRESSION:."
)


class ModelConfig(_Section):
    """The vision-language model a worker loads, from a local directory only."""

    path: ConfigPath | None = Field(
        None, description="model directory; default <state_dir>/models/demo, built if absent"
    )
    adapter: ConfigPath | None = Field(None, description="optional peft LoRA adapter directory")
    quantization: Literal["nf4", "int8", "none"] = Field(
        "nf4", description="bitsandbytes 4-bit NF4, 8-bit, or full precision")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when present")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    prompt: str = Field(DEFAULT_PROMPT, description="instruction; placeholders {views}, {indication}")
    send_indication: bool = Field(
        False, description="put the request's reason text in the prompt (free text may hold PHI)"
    )
    max_images: int = Field(2, ge=1, le=8, description="views per study (frontal, then lateral)")
    image_size: int = Field(896, ge=64, le=4096, description="longest side sent to the worker")
    generation: GenerationConfig = GenerationConfig()
    identity: ModelIdentity | None = Field(
        None, description="the model the SRs name, pinned (workers on another host: the output "
                          "of `cxr-node model identity` there); default: computed by the node "
                          "from model.path, or DEMO when it cannot read it (model.identity.*)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        try:
            v.format(views="", indication="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                "a prompt whose only placeholders are {views} and {indication}"
            ) from exc
        return v


class ReportConfig(_Section):
    series_number: int = Field(9901, ge=1, le=2**31 - 1, description="SeriesNumber of the drafts")
    series_description: str = Field("AI PRELIMINARY DRAFT", min_length=1, max_length=64,
                                    description='"AI DRAFT — NOT VERIFIED" is added if not said')
    institution_name: str | None = Field(None, max_length=64, description="InstitutionName in the SR")
    uid_root: str | None = Field(
        None, description="your organisation's UID root; default: pydicom's root"
    )
    manufacturer: str = Field("cxr-node", max_length=64, description="Manufacturer in the SR")
    pdf_fonts: list[ConfigPath] = Field(
        [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
         Path("/usr/share/fonts/opentype/ipafont-gothic/ipagp.ttf"),
         Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")],
        min_length=1, max_length=16,
        description="font files (TrueType/OpenType) of the pdf and page renditions: each "
                    "character is drawn with the first that has it, and a draft with a character "
                    "none has gets no rendition (a reason names it); default: Debian's "
                    "fonts-dejavu-core, fonts-ipafont-gothic, fonts-noto-color-emoji")
    pdf_bold_font: ConfigPath = Field(
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
        description="bold font of the labels and headings in the pdf and page renditions; "
                    "characters it lacks come from pdf_fonts")

    @field_validator("uid_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.rstrip(".") + "."
        if not re.fullmatch(r"([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.", v) or len(v) > 32:
            raise ValueError("a UID root of digits and dots, at most 32 characters")
        return v


class DestinationTLSConfig(TLSConfig):
    """DICOM TLS to a PACS: its certificate must chain to ``ca_certificates`` and be the PACS's.

    Identity is the name check (``server_name``, else the destination's host, against the
    certificate's subjectAltName), or, for a PACS whose certificate names neither, a pinned
    certificate fingerprint: a CA bundle alone would let any certificate it issued (a
    modality's, say) pose as the PACS.
    """

    server_name: str | None = Field(
        None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:-]+$",
        description="DNS name or IP address the PACS certificate must carry; default: host")
    pinned_sha256: list[str] = Field(
        [], description="SHA-256 fingerprints of the accepted PACS certificates, checked "
                        "instead of the name (hex; colons allowed)")

    @field_validator("pinned_sha256")
    @classmethod
    def _fingerprints(cls, v: list[str]) -> list[str]:
        cleaned = [f.replace(":", "").strip().lower() for f in v]
        for f in cleaned:
            if not re.fullmatch(r"[0-9a-f]{64}", f):
                raise ValueError("SHA-256 fingerprints: 64 hex digits each "
                                 "(openssl x509 -noout -fingerprint -sha256 -in pacs.pem)")
        return cleaned


class DispatchConfig(_Section):
    max_attempts: int = Field(20, ge=1, description="sends before a report is dead-lettered")
    backoff_initial_seconds: float = Field(5.0, gt=0, description="first retry delay (doubles)")
    backoff_max_seconds: float = Field(900.0, gt=0, description="longest retry delay")


class LimitsConfig(_Section):
    """Bounds on what a peer can make the node store, allocate or decode.

    Each is checked from a header or a length before the memory or the work is committed, so a
    dataset that declares a giant image costs a refusal, not a decode.
    """

    max_dataset_mb: int = Field(
        512, ge=1, le=65536,
        description="largest dataset one C-STORE may carry; a larger one is refused")
    max_image_pixels: int = Field(
        50_000_000, ge=1,
        description="Rows x Columns x frames x samples an image may declare (checked before decoding)")
    max_decoded_mb: int = Field(
        256, ge=1, description="largest decoded pixel data of one image (pixels x bits allocated)")
    decode_memory_mb: int = Field(
        2048, ge=256,
        description="address-space limit (RLIMIT_AS) of the child process that decodes images; "
                    "the largest image the limits above admit needs about 1 GB")
    decode_timeout_seconds: float = Field(
        120.0, gt=0,
        description="an image not decoded and rendered within this fails with a reason")
    max_draft_characters: int = Field(
        8000, ge=100, le=100_000,
        description="longest Findings + Impression text the node takes from a worker")


class RetentionConfig(_Section):
    """How long the node keeps patient data. It is a drafting node, not an archive: the PACS keeps
    the images and the drafts; here they are deleted once a study is finished (sent, skipped,
    failed, or reported with nothing left to send) and old enough. null keeps them."""

    images_days: float | None = Field(
        30.0, gt=0, description="spooled images of a finished study are deleted after this")
    studies_days: float | None = Field(
        90.0, gt=0, description="then its draft SR files and database rows (the audit trail "
                                "stays)")
    quarantine_days: float | None = Field(
        14.0, gt=0, description="refused datasets in quarantine/ are deleted after this")
    quarantine_max_mb: int | None = Field(
        1024, ge=1, description="and the oldest first while quarantine/ holds more than this")
    interval_minutes: float = Field(60.0, gt=0, le=1440,
                                    description="how often the node looks for what is due")

    @model_validator(mode="after")
    def _order(self) -> RetentionConfig:
        if self.studies_days is not None and (
                self.images_days is None or self.studies_days < self.images_days):
            raise ValueError("studies_days at least images_days: a study's rows are what find "
                             "its images")
        return self


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    phi: bool = Field(False, description="log patient and study identifiers (off by default)")


class HttpConfig(_Section):
    """Metrics, health check and the status page: loopback only unless IT says otherwise."""

    enabled: bool = Field(True, description="serve /metrics, /healthz and the status page")
    host: str = Field("127.0.0.1", description="address of the HTTP endpoint")
    port: int = Field(9464, ge=0, le=65535, description="its port")
    allowed_hosts: list[str] = Field(
        [], description="other names the endpoint may be called by in the Host header (its "
                        "address and, on loopback, localhost always work)")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
                raise ValueError("host names such as metrics.hospital.example (no port, no scheme)")
        return [h.lower() for h in v]


class FeedbackHl7Config(_Section):
    """The MLLP listener that takes signed reports (ORU^R01, result status F or C) from a RIS or
    interface engine: plain MLLP (or TLS), from the networks listed only."""

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every address)")
    port: int = Field(2575, ge=1, le=65535, description="MLLP port")
    accept: list[str] = Field(
        min_length=1, description="networks the RIS or interface engine connects from, such as "
                                  "10.20.0.0/24; a connection from anywhere else is closed at once")
    application: str = Field("CXR_NODE", description="MSH-3 of the acknowledgments, as the "
                                                     "sender knows this node")
    facility: str = Field("", description="MSH-4 of the acknowledgments")
    max_message_kb: int = Field(1024, ge=4, le=16384,
                                description="largest MLLP block; a larger one closes the connection")
    max_connections: int = Field(4, ge=1, le=256,
                                 description="connections at once; another is closed at once")
    timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="a connection silent this long, or a message not complete "
                                         "within it, is closed (the sender reconnects)")
    tls: TLSConfig | None = Field(None, description="MLLP over TLS: the keys of tls.* (with "
                                                    "require_client_certificate to know the sender)")

    @field_validator("host")
    @classmethod
    def _ip_address(cls, v: str) -> str:
        return NodeConfig._ip_address(v)

    @field_validator("application", "facility")
    @classmethod
    def _namespace(cls, v: str, info: ValidationInfo) -> str:
        shortest = 1 if info.field_name == "application" else 0  # MSH-4 may be empty
        if not re.fullmatch(rf"[^|^~\\&\x00-\x1f\x7f]{{{shortest},20}}", v):
            raise ValueError("an HL7 namespace ID: at most 20 characters, none of | ^ ~ \\ & and "
                             "no control character")
        return v

    @field_validator("accept")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(n, strict=False)) for n in v]
        except ValueError:
            raise ValueError("networks such as 10.20.0.0/24 or 127.0.0.1/32") from None

    def admits(self, address: str) -> bool:
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(peer in ipaddress.ip_network(n) for n in self.accept)


class FeedbackConfig(_Section):
    """Signed reports, the ground truth the node measures its drafts against."""

    dicom: bool = Field(True, description="accept signed reports as DICOM SR over C-STORE (Basic "
                                          "Text, Enhanced, Comprehensive SR; VERIFIED and COMPLETE)")
    hl7: FeedbackHl7Config | None = Field(
        None, description="an MLLP listener for signed reports as HL7 v2 ORU^R01 (off when "
                          "absent; feedback.hl7.*)")
    max_sr_kb: int = Field(4096, ge=16, le=65536,
                           description="largest signed SR kept; a larger one is refused (0xC000)")
    max_text_characters: int = Field(
        20000, ge=100, le=200_000, description="longest signed report text kept; a longer one "
                                               "is ignored (or refused with AR) with the reason")
    wait_days: float = Field(7.0, gt=0, le=365, description="a signed report without a draft "
                                                            "waits this long for one, then counts "
                                                            "as unpaired (its text is dropped)")
    window_pairs: int = Field(200, ge=1, le=100_000,
                              description="rolling agreement: at most the last this many pairs")
    window_days: float = Field(30.0, gt=0, le=3650,
                               description="rolling agreement: pairs of at most this many days")


class PromoteConfig(_Section):
    """How much worse than the model in service an adapter may be on its held-out studies."""

    max_label_f1_drop: float = Field(
        0.0, ge=0, le=1, description="label F1 (micro, 14 observations) the adapter may lose")
    max_added_significant_misses: int = Field(
        0, ge=0, description="held-out reports with a significant miss the adapter may add")


class AdaptationConfig(_Section):
    """Site adaptation: `cxr-node train` and the guard before an adapter drafts live studies."""

    promote: PromoteConfig = PromoteConfig()


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeConfig = NodeConfig()
    accept: list[AcceptRule] = []
    study: StudyConfig = StudyConfig()
    queue: QueueConfig = QueueConfig()
    model: ModelConfig = ModelConfig()
    report: ReportConfig = ReportConfig()
    destinations: list[Any] = Field(
        [], description="where drafts are sent, each a kind chosen by type: (below)")
    dispatch: DispatchConfig = DispatchConfig()
    limits: LimitsConfig = LimitsConfig()
    retention: RetentionConfig = RetentionConfig()
    logging: LoggingConfig = LoggingConfig()
    http: HttpConfig = HttpConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    adaptation: AdaptationConfig = AdaptationConfig()

    source: Path | None = Field(None, exclude=True)

    @field_validator("accept")
    @classmethod
    def _subjects_need_verified_certificates(cls, v: list[AcceptRule],
                                             info: ValidationInfo) -> list[AcceptRule]:
        node = info.data.get("node")
        if any(r.certificate_subject for r in v) and (
                node is None or node.tls is None or node.tls.ca_certificates is None):
            raise ValueError("node.tls with ca_certificates when a rule names a "
                             "certificate_subject (only a verified certificate has a subject "
                             "to trust)")
        return v

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, v: Any, info: ValidationInfo) -> Any:
        """Each entry validated by the settings of its kind (cxr_node.destinations)."""
        from cxr_node.destinations import settings_adapter

        return settings_adapter().validate_python(v, context=info.context)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(dupes)}")
        return self

    # Derived locations: everything the node writes lives under state_dir.
    @property
    def state_dir(self) -> Path:
        return self.node.state_dir

    @property
    def database_path(self) -> Path:
        return self.state_dir / "cxr-node.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def reports_dir(self) -> Path:
        return self.state_dir / "reports"

    @property
    def feedback_dir(self) -> Path:
        return self.state_dir / "feedback"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "queue"

    @property
    def model_path(self) -> Path:
        return self.model.path or self.state_dir / "models" / "demo"


def broker_password(role: Literal["node", "worker"] = "node") -> str | None:
    """The Redis password of the node or of a worker: systemd credential, else environment.

    Never from YAML. Each role has its own, so a worker host's secret grants a worker's access only.
    """
    credential, env = ((BROKER_PASSWORD_CREDENTIAL, BROKER_PASSWORD_ENV) if role == "node"
                       else (WORKER_BROKER_PASSWORD_CREDENTIAL, WORKER_BROKER_PASSWORD_ENV))
    return read_secret(credential, env)


def read_secret(credential: str, env: str) -> str | None:
    """A secret: the systemd credential of that name ($CREDENTIALS_DIRECTORY) when the service
    has it, else the environment variable ``env`` (tests, runs without systemd). Never YAML."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / credential
        if cred.is_file():
            return cred.read_text().strip()
    return os.environ.get(env) or None


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: Path | str, environ: dict[str, str] | None = None) -> Config:
    """Read, override from the environment and validate one YAML file, or raise ConfigError."""
    path = Path(path)
    environ = dict(os.environ if environ is None else environ)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the configuration file ({exc.strerror})"]) from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError([f"{path}:{line} not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (node, accept, ...)"])
    for var, keys in ENV_OVERRIDES.items():
        if environ.get(var):
            section = data.setdefault(keys[0], {})
            if isinstance(section, dict):
                section[keys[1]] = environ[var]
    try:
        return Config.model_validate({**data, "source": path.resolve()},
                                     context={"base": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError([_describe(path, root, err) for err in exc.errors()]) from None


def _describe(path: Path, root: yaml.Node | None, err: Any) -> str:
    from cxr_node.destinations import KINDS

    # a destination's kind is a step in pydantic's location (destinations, 0, dicom, port), not
    # in the file
    loc = [p for i, p in enumerate(err["loc"])
           if not (i == 2 and err["loc"][0] == "destinations" and p in KINDS)]
    key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    line = _line_of(root, loc)
    where = f"{path}:{line}" if line else f"{path}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{key}'; check the spelling against the configuration reference"
    if err["type"] == "missing":
        return f"{where}: '{key}' is required"
    value = err.get("input")
    shown = _mask(repr(value)) if not isinstance(value, (dict, list)) else type(value).__name__
    expected = msg.removeprefix("Input should be ")
    return f"{where}: '{key}' = {shown}: expected {expected[:1].lower() + expected[1:]}"


def _mask(text: str) -> str:
    """Hide whatever could be a secret written into a URL (user info, query values), so an
    error message never repeats it."""
    text = re.sub(r"(://)[^/@\s]*@", r"\1***@", text)
    return re.sub(r"([?&;][^=&;#\s]*=)[^&;#\s'\"]*", r"\1***", text)


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, for a precise message."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def effective_config(config: Config) -> dict[str, Any]:
    """The configuration as the node will use it, for `config check`; secrets are never in it."""
    data = config.model_dump(mode="json")
    if not config.queue.embedded:
        data["queue"]["broker_password"] = "***" if broker_password("node") else None
        data["queue"]["worker_broker_password"] = "***" if broker_password("worker") else None
    return data


def reference() -> str:
    """Every key with its type, default and meaning, as a Markdown table (README, `config reference`)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str, skip: Iterable[str] = ()) -> None:
        for name, field in model.model_fields.items():
            if name == "source" or name in skip:
                continue
            key = f"{prefix}{name}"
            nested = _section_type(field.annotation)
            if nested is not None and not issubclass(nested, TLSConfig):  # DICOM TLS: below
                if get_origin(field.annotation) is list:
                    key += "[]"
                walk(nested, key + ".")
                continue
            default = "" if field.is_required() else _shown(field.get_default(call_default_factory=True))
            rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | "
                        f"{(field.description or '').replace('|', '/')} |")

    from cxr_node.destinations import KINDS

    walk(Config, "")
    for kind_name, kind in KINDS.items():
        rows.append(f"| **destinations[] (type: {kind_name})** | | | |")
        walk(kind.settings, "destinations[].", skip=("type",))
    rows.append("| **tls** | | | |")
    walk(TLSConfig, "tls.")
    rows.append("| **destinations[].tls (sending only)** | | | |")
    walk(DestinationTLSConfig, "destinations[].tls.", skip=TLSConfig.model_fields)
    return "\n".join(rows) + "\n"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (list, Union, UnionType) and len(args) == 1:
        return _section_type(args[0])  # a list of sections, or an optional one
    return None


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "null")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    text = re.sub(r"\bcxr_node\.[\w.]*\.(?=[A-Z])", "", text)  # a class, not its module
    text = re.sub(r"Optional\[(.*)\]", r"\1 | null", text)
    text = re.sub(r"Literal\[(.*)\]", lambda m: m.group(1).replace("'", "").replace(", ", " / "), text)
    return text.replace(" | None", " | null").replace("|", "or")


def _shown(value: Any) -> str:
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, str) and len(value) > 40:
        return "(see config/single-machine.yaml)" if value == DEFAULT_PROMPT else f"`{value[:37]}...`"
    return f"`{json.dumps(value, default=str)}`"
