"""The adapter card: what an adapter is for, what it learnt from, and how it did on held-out studies.

`cxr-node train` writes ``adapter-card.json`` next to the adapter's weights. Three readers:

* the worker and the node (`identity.model_identity`), which refuse an adapter whose card names
  another base model than the one loaded (a LoRA on other weights writes nonsense, silently);
* `cxr-node model promote`, which compares its held-out scores with the model in service;
* people: the card says the data's size, dates, sources and licences, and the training settings.

No patient data is in a card: counts, dates as days, source names and licences, scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxr_node.durable import write_atomic
from cxr_node.identity import CARD_NAME

__all__ = ["CARD_NAME", "AdapterCard", "CardError", "read_card"]
CARD_FORMAT = 1
MAX_CARD_BYTES = 1 << 20


class CardError(Exception):
    """A card that is missing, unreadable, or not for this base model."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(_Part):
    """The model the adapter was trained on."""

    name: str
    version: str
    architecture: str
    checksum: str = Field(pattern=r"^[0-9a-f]{64}$",
                          description="identity.weights_checksum of the base model's folder")


class DataSource(_Part):
    """One source of training studies: its name (corpus, node) and licence, with counts."""

    source: str
    licence: str
    studies: int = Field(ge=0)


class TrainingData(_Part):
    studies: int = Field(ge=0, description="studies trained on")
    patients: int = Field(ge=0, description="patients among them")
    heldout_studies: int = Field(ge=0)
    heldout_patients: int = Field(ge=0)
    left_out: int = Field(ge=0, description="studies of the data not used (images unusable)")
    first_day: str | None = Field(None, description="earliest study day, where the data says")
    last_day: str | None = None
    sources: list[DataSource]
    manifest_sha256: str
    identifiers_removed: dict[str, int] = Field(
        default_factory=dict, description="identifiers taken out of report text, by kind")


class HeldOut(_Part):
    """Scores of one model on the held-out studies, from `cxr-node eval run`."""

    model: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$",
                             description="the identity fingerprint of the model as evaluated "
                                         "(weights, adapter, prompt, quantization, generation)")
    studies: int = Field(ge=0)
    scores: dict[str, float | None]
    significant_misses: int = Field(ge=0, description="reports with a significant miss")

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> HeldOut:
        """From the summary.json of an evaluation run."""
        scores = {s["name"]: s["value"] for s in summary["scores"]}
        scored = summary["studies"]["scored"]
        model = summary["model"]
        adapter = f" + {model['adapter']}" if model.get("adapter") else ""
        return cls(model=model["name"] + adapter, fingerprint=model["fingerprint"],
                   studies=scored, scores=scores,
                   significant_misses=round((scores.get("significant misses") or 0.0) * scored))


class AdapterCard(_Part):
    format: int = CARD_FORMAT
    name: str
    version: str
    created: str
    base: BaseModelRef
    demo: bool = Field(description="trained on a DEMO base: its drafts stay DEMO")
    data: TrainingData
    training: dict[str, Any] = Field(description="the settings the adapter was trained with")
    heldout: dict[str, HeldOut] = Field(
        default_factory=dict, description="'adapter' and 'base' on the same held-out studies")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / CARD_NAME
        write_atomic(path, (self.model_dump_json(indent=2) + "\n").encode())
        return path


def read_card(folder: Path) -> AdapterCard | None:
    """The card in an adapter folder, None when it has none; CardError when it is unreadable."""
    path = Path(folder) / CARD_NAME
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CARD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CardError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"{path}: larger than {MAX_CARD_BYTES} bytes: not an adapter card")
    try:
        return AdapterCard.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else ""
        why = first["msg"] if first else str(exc)[:200]
        raise CardError(f"{path}: not an adapter card of this version ({where}: {why})") from None
