"""Destinations: where the drafts go, one module per kind, chosen by ``type:`` in the YAML.

A kind is its settings (a pydantic model with ``type: Literal["<kind>"]``, see ``base``) and a
factory that makes a sender from them. Registering it here is all a new kind needs: the
configuration accepts it, the outbox sends to it (with its own retries, lanes, dead letters and
audit, unchanged), and `cxr-node config check --connect` runs its ``check``.

Entries written before ``type:`` existed name their kind by their keys: ``ae_title`` (DICOM) or
``folder``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from cxr_node.destinations import dicom, dicomweb, folder, hl7
from cxr_node.destinations.base import (
    Check,
    Delivery,
    Destination,
    DestinationSettings,
    Draft,
    Rendition,
)

__all__ = ["KINDS", "Check", "Delivery", "Destination", "DestinationSettings", "Draft", "Kind",
           "Rendition", "make", "settings_adapter"]


@dataclass(frozen=True)
class Kind:
    """A kind of destination: its settings, and how a sender is made from them (with the
    node's AE title, which DICOM kinds call from by default)."""

    settings: type[DestinationSettings]
    make: Callable[[Any, str], Destination]


KINDS: dict[str, Kind] = {
    "dicom": Kind(dicom.DicomDestination, dicom.DicomStore),
    "dicomweb": Kind(dicomweb.DicomWebDestination, dicomweb.DicomWebStore),
    "folder": Kind(folder.FolderDestination, folder.Folder),
    "hl7": Kind(hl7.Hl7Destination, hl7.Hl7Sender),
}
"""The registry: ``type:`` -> kind. A new kind is one module and one line here."""

LEGACY_KEYS = {"ae_title": "dicom", "folder": "folder"}


def kind_of(entry: Mapping[str, Any]) -> str | None:
    """The kind an entry names: its ``type``, or for an entry without one, the key that says it."""
    if "type" in entry:
        return str(entry["type"])
    return next((kind for key, kind in LEGACY_KEYS.items() if key in entry), None)


def settings_adapter() -> TypeAdapter[list[DestinationSettings]]:
    """Validates a list of destination entries, each by its kind's settings; built for the kinds
    registered now, so that one added at run time (a site's, a test's) is taken too."""
    return _adapter(tuple(KINDS))


@cache
def _adapter(kinds: tuple[str, ...]) -> TypeAdapter[list[DestinationSettings]]:
    members = tuple(Annotated[KINDS[k].settings, Tag(k)] for k in kinds)
    which = Discriminator(
        _tag, custom_error_type="destination_kind",
        custom_error_message=f"a destination with type: {' / '.join(kinds)} (each kind's keys: "
                             "cxr-node config reference)")
    union = Annotated[Union[members], which]  # noqa: UP007 (built at run time)
    return TypeAdapter(list[union])  # type: ignore[valid-type]


def _tag(entry: Any) -> str | None:
    if isinstance(entry, DestinationSettings):
        return entry.type
    return kind_of(entry) if isinstance(entry, Mapping) else None


def make(settings: DestinationSettings, node_ae_title: str) -> Destination:
    """The sender for one configured destination."""
    return KINDS[settings.type].make(settings, node_ae_title)
