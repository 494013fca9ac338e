"""Structured logging: one JSON line per event, patient identifiers kept out unless asked for.

Events name what happened (``instance.stored``, ``study.state``); fields carry the context. Keys that
can hold patient or study identifiers are removed before a line is written, unless the configuration
sets ``logging.phi: true`` on purpose.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any

import pydicom.config
import structlog

# Fields that identify a patient or a study; dropped from log lines unless logging.phi is on.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "accession_number",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "indication",
    }
)


def study_key(study_uid: str) -> str:
    """A short, stable, non-identifying handle for a study, safe to log and to show."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def _drop_phi(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in PHI_KEYS.intersection(event):
        del event[key]
    return event


def configure_logging(level: str = "INFO", phi: bool = False, stream: Any = None) -> None:
    """Route structlog and the standard library (pynetdicom, celery) to JSON lines on one stream."""
    stream = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not phi:
        processors.append(_drop_phi)
    processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=processors[:-2],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    """Library chatter quotes UIDs and header values: keep only their real problems."""
    # pynetdicom logs every PDU, highdicom every copied dataset's UID, at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # fontTools' subsetter lists the glyphs of every PDF rendition (what its text uses) at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    # dicomweb-client logs a server's Warning header as it comes, and its retrying library each
    # failed request with a traceback: a delivery's reason says what happened, once.
    logging.getLogger("dicomweb_client").setLevel(logging.ERROR)
    logging.getLogger("retrying").setLevel(logging.ERROR)
    # pydicom's reading checks warn with the offending value (a name, a birth date) quoted.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
