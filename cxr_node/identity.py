"""Which model wrote a draft: the identity an SR names, and why the node, not a worker, decides it.

No torch here: the worker and the node compute a model's identity the same way, from its folder
(files, ``cxr-model.json``) and the model settings (adapter, prompt, quantization, generation).
The worker reports its identity with every result; the node checks the reported fingerprint
against the identity it expects, and the SR names the node's identity, never the worker's words:

* ``model.identity`` pinned in the node's configuration (workers on another host: the admin
  copies what `cxr-node model identity` prints there), else
* the identity of ``model.path`` computed by the node itself, when it can read that folder (one
  machine: the demo model the local worker builds on first start, or a shared model folder),
  recomputed when a file in it changes, else
* none: the node cannot vouch for the model; the SR names it "unverified model" and every
  draft is a DEMO, whatever the worker says about its name or ``demo``.

A worker whose fingerprint differs from the expected one has loaded another model (or other
weights, adapter, prompt or generation settings): its draft fails with a reason saying so.
The fingerprint identifies a model; it is not a tamper check (large files count by their size and
first and last MiB), and a worker can always claim the expected fingerprint: what a worker can
never do is name the model in the SR or take the DEMO label away.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from cxr_node.config import Config, ModelConfig

log = structlog.get_logger("cxr_node.identity")

MANIFEST_NAME = "cxr-model.json"
CARD_NAME = "adapter-card.json"  # cxr_node.adaptation.card reads it
_PARTIAL_HASH_BYTES = 1 << 20  # files above 2 MiB are fingerprinted by size + first and last MiB
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LO_BYTES = 64
DEMO_LABEL = "DEMO MODEL"
UNVERIFIED = "unverified model"


class IdentityError(Exception):
    """A model's identity cannot be established, or a worker's model is not the expected one."""


def _long_string(value: str) -> str:
    """A value that fits a DICOM LO element unchanged, since every field lands in one."""
    if not value.strip():
        raise ValueError("a non-empty text")
    if len(value.encode()) > LO_BYTES:
        raise ValueError(f"at most {LO_BYTES} bytes in UTF-8 (a DICOM LO value)")
    if "\\" in value:
        raise ValueError("a text without backslash (the DICOM value separator)")
    if _CONTROL.search(value):
        raise ValueError("a text without control characters")
    return value


LongString = Annotated[str, AfterValidator(_long_string)]


class ModelIdentity(BaseModel):
    """What an SR names as its algorithm; ``fingerprint`` changes with weights, adapter or prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: LongString = Field(description="model name the SRs give (device observer, equipment)")
    version: LongString = Field(description="model version the SRs give (SoftwareVersions)")
    architecture: LongString = Field(description="the model's config.json model_type, e.g. gemma3")
    quantization: LongString = Field(description="quantization the workers load it with")
    adapter: LongString | None = Field(None, description="LoRA adapter as name@version, if any")
    fingerprint: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of weights, adapter, prompt and generation settings, as "
                    "`cxr-node model identity` prints it on a worker host")
    demo: bool = Field(description="true: every draft is labelled DEMO MODEL, not a clinical "
                                   "report; false only for a model validated for clinical use")

    @property
    def description(self) -> str:
        """One line for people: name, version, architecture, quantization, adapter."""
        adapter = f", adapter {self.adapter}" if self.adapter else ""
        demo = f" [{DEMO_LABEL}]" if self.demo else ""
        return f"{self.name} {self.version} ({self.architecture}, {self.quantization}{adapter}){demo}"


# --- computing an identity from a folder ---------------------------------------------------------


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= 2 * _PARTIAL_HASH_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(_PARTIAL_HASH_BYTES))
            f.seek(-_PARTIAL_HASH_BYTES, os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()


def _folder_digest(folder: Path, label: str) -> list[Any]:
    """Every file of the folder but the descriptions (manifest, adapter card): what the model
    computes with. Sub-folders (an adapter's training work) do not count."""
    return [
        [label, p.name, p.stat().st_size, _file_digest(p)]
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (MANIFEST_NAME, CARD_NAME)
    ]


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def weights_checksum(model_dir: Path) -> str:
    """sha256 over a base model's files alone (no settings): what an adapter card names as its
    base, so that a change of prompt or quantization does not orphan an adapter."""
    return _digest(_folder_digest(Path(model_dir), "model"))


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over an adapter's files (weights and configuration, not its card or manifest)."""
    return _digest(_folder_digest(Path(adapter_dir), "adapter"))


def adapter_version(adapter_dir: Path) -> str:
    """The short digest of an adapter's files: its version when its manifest gives none."""
    return adapter_digest(adapter_dir)[:12]


def adapter_label(adapter_dir: Path) -> str:
    """name@version of an adapter as the SRs give it: its manifest's, else the folder's name and
    the short digest of its files."""
    manifest = read_manifest(adapter_dir)
    version = manifest.get("version") or adapter_version(adapter_dir)
    return f"{manifest.get('name', Path(adapter_dir).resolve().name)}@{version}"


def check_adapter_base(adapter_dir: Path, model_dir: Path) -> None:
    """IdentityError when the adapter's card names another base model than ``model_dir``'s.

    A LoRA adapter loads onto any model of the same shape and then writes fluent nonsense; the
    card is the only record of which weights it was trained on. An adapter without a card (one
    trained elsewhere) is not checked here; `cxr-node model promote` needs a card.
    """
    from cxr_node.adaptation.card import CardError, read_card

    try:
        card = read_card(adapter_dir)
    except CardError as exc:
        raise IdentityError(str(exc)) from None
    if card is None:
        return
    found = weights_checksum(model_dir)
    if card.base.checksum != found:
        raise IdentityError(
            f"adapter {adapter_dir} was trained on {card.base.name} {card.base.version} "
            f"(checksum {card.base.checksum[:12]}...), not on the model in {model_dir} "
            f"(checksum {found[:12]}...): load it on its base, or train one for this model")


def fingerprint(config: ModelConfig, model_dir: Path) -> str:
    """sha256 over the model's and adapter's files, the prompt, quantization and generation settings.

    Large files count by name, size and their first and last MiB, so a multi-GB checkpoint is
    fingerprinted in milliseconds; small files (config, tokenizer, chat template) count whole.
    """
    parts: list[Any] = _folder_digest(Path(model_dir), "model")
    if config.adapter is not None:
        parts += _folder_digest(Path(config.adapter), "adapter")
    parts.append(
        {
            "prompt": config.prompt,
            "quantization": config.quantization,
            "generation": config.generation.model_dump(mode="json"),
        }
    )
    return _digest(parts)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The optional cxr-model.json: {"name": str, "version": str, "demo": bool}, each optional."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is not readable JSON ({exc})") from None
    types = {"name": str, "version": str, "demo": bool}
    if not isinstance(data, dict) or set(data) - set(types):
        raise IdentityError(f"{path} must be an object with only the keys name, version, demo")
    for key, kind in types.items():
        if key in data and not isinstance(data[key], kind):
            raise IdentityError(f"{path}: {key!r} must be a {kind.__name__}, got {data[key]!r}")
    return data


def architecture_of(model_dir: Path) -> str:
    """The model_type in the folder's config.json (gemma3, llava, ...)."""
    path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise IdentityError(f"{path} is not a readable model configuration") from None
    if not isinstance(model_type, str) or not model_type:
        raise IdentityError(f"{path} names no model_type")
    return model_type


def model_identity(config: ModelConfig, model_dir: Path) -> ModelIdentity:
    """The identity of the model in ``model_dir`` loaded with ``config``'s settings."""
    model_dir = Path(model_dir)
    digest = fingerprint(config, model_dir)
    manifest = read_manifest(model_dir)
    adapter = None
    if config.adapter is not None:
        check_adapter_base(Path(config.adapter), model_dir)
        adapter = adapter_label(Path(config.adapter))
    try:
        return ModelIdentity(
            name=manifest.get("name", model_dir.resolve().name),
            version=manifest.get("version", digest[:12]),
            architecture=architecture_of(model_dir),
            quantization=config.quantization,
            adapter=adapter,
            fingerprint=digest,
            demo=manifest.get("demo", False),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise IdentityError(
            f"{model_dir}: the model's {field} is not usable in an SR "
            f"({error['msg'].removeprefix('Value error, ')}); set it in {MANIFEST_NAME}"
        ) from None


def check_pinned_identity(config: ModelConfig, model_dir: Path) -> None:
    """A worker whose configuration pins ``model.identity`` (the node's file, copied) refuses to
    start with another model, rather than have the node refuse each of its drafts."""
    pinned = config.identity
    if pinned is None:
        return
    found = model_identity(config, model_dir)
    if found.fingerprint != pinned.fingerprint:
        raise IdentityError(
            f"the model in {model_dir} (fingerprint {found.fingerprint}) is not the one "
            f"model.identity pins ({pinned.fingerprint}): the node would refuse its drafts; "
            "load the pinned model, or pin this one (`cxr-node model identity`)"
        )


# --- what the node vouches for --------------------------------------------------------------------


class ExpectedModel:
    """The node's side: which model its SRs name, and the check of each worker's claim.

    ``refusal`` (the node passes `adaptation.promote.unpromoted`) says why the configured adapter
    may not draft, or None; it is asked again whenever the model's files change, so an adapter
    replaced on disk after its promotion fails every draft until it is promoted in turn.
    """

    def __init__(self, config: ModelConfig, model_dir: Path,
                 refusal: Callable[[], str | None] | None = None):
        self.config = config
        self.model_dir = Path(model_dir)
        self._refusal_of = refusal
        self._computed: tuple[Any, ModelIdentity, str | None] | None = None
        self._warned = False

    def expected(self) -> tuple[ModelIdentity, str] | None:
        """The identity the node expects and where it comes from, or None if it cannot know."""
        pinned = self.config.identity
        signature = None  # a pinned identity is read once
        if pinned is None:
            try:
                signature = self._signature()
            except OSError:
                return None  # not here, or not readable by the node (a worker-only folder)
        if self._computed is None or self._computed[0] != signature:
            identity = pinned or model_identity(self.config, self.model_dir)
            refusal = self._refusal_of() if self._refusal_of is not None else None
            self._computed = (signature, identity, refusal)
        _, identity, refusal = self._computed
        if refusal is not None:
            raise IdentityError(refusal)
        return identity, "model.identity" if pinned else f"the model in {self.model_dir}"

    def identity_for(self, reported: ModelIdentity) -> ModelIdentity:
        """What the SR of a draft from a worker reporting ``reported`` names as its model.

        Raises IdentityError when the worker's model is not the one the node expects.
        """
        try:
            known = self.expected()
        except (IdentityError, OSError) as exc:
            raise IdentityError(f"the node cannot establish the model's identity: {exc}") from None
        if known is None:
            if not self._warned:
                self._warned = True
                log.warning("model.identity_unverified", model_path=str(self.model_dir),
                            reason="model.identity is not set and model.path cannot be read "
                                   "here: every draft is labelled DEMO MODEL")
            return ModelIdentity(name=UNVERIFIED, version=UNVERIFIED, architecture=UNVERIFIED,
                                 quantization=self.config.quantization, adapter=None,
                                 fingerprint=reported.fingerprint, demo=True)
        identity, source = known
        if reported.fingerprint != identity.fingerprint:
            raise IdentityError(
                f"the worker's model (fingerprint {reported.fingerprint[:12]}...) is not the one "
                f"this node expects ({source}, fingerprint {identity.fingerprint[:12]}...): its "
                "weights, adapter, prompt, quantization or generation settings differ"
            )
        return identity

    def _signature(self) -> list[tuple[str, str, int, int]]:
        """Names, sizes and modification times of the files: cheap, and changes with them."""
        folders = [self.model_dir, *([Path(self.config.adapter)] if self.config.adapter else [])]
        found = []
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        st = entry.stat()
                        found.append((str(folder), entry.name, st.st_size, st.st_mtime_ns))
        return sorted(found)


def identity_notes(config: Config) -> list[str]:
    """For `cxr-node config check`: where the SRs' model identity will come from, and whether the
    configuration needs ``model.identity``."""
    pinned = config.model.identity
    if pinned is not None:
        return [f"model identity: pinned by model.identity: {pinned.description}, fingerprint "
                f"{pinned.fingerprint}; a worker whose model differs fails its drafts"]
    path = config.model_path
    if config.model.path is None and not path.exists() and config.queue.runs_local_worker:
        return [f"model identity: the demo model, built in {path} by the local worker on first "
                "start; every draft is labelled DEMO MODEL"]
    try:
        identity = model_identity(config.model, path)
    except (IdentityError, OSError) as exc:
        why = f"{path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        return [
            f"model identity: not known to the node ({why}). Every draft will be labelled DEMO "
            "MODEL, whatever the workers report.",
            "  For workers on another host, run `cxr-node model identity --config FILE` there "
            "with their configuration and copy its output under model.identity here.",
        ]
    return [f"model identity: computed by the node from {path}: {identity.description}, "
            f"fingerprint {identity.fingerprint}; workers must load this model with the same "
            "model settings (a worker whose fingerprint differs fails its drafts)"]
