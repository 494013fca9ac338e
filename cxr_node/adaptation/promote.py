"""`cxr-node model promote`: the guard an adapter passes before it drafts a live study.

An adapter is compared with the model in service on the adapter's held-out studies (patients it
never saw), each model as the node would serve it: the configuration's prompt, quantization and
generation settings. The scores come from the adapter card when it measured exactly that model
(same identity fingerprint), else from an evaluation run here, on the held-out manifest the
training left in ``ADAPTER_DIR/training/``. The adapter is refused when its label F1 falls by more
than ``adaptation.promote.max_label_f1_drop`` or it adds more than
``adaptation.promote.max_added_significant_misses`` reports with a significant miss; also when it
has no card, no held-out scores, or was trained on another base model.

Every decision goes to the audit trail and to the node's state. The node serves only an adapter
whose last decision accepted it (`unpromoted`, checked when the node starts): changing
``model.adapter`` in the YAML is not enough to put an unmeasured adapter in front of radiologists.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cxr_node import audit
from cxr_node.adaptation.card import CardError, HeldOut, read_card
from cxr_node.config import Config
from cxr_node.identity import (
    IdentityError,
    adapter_digest,
    adapter_label,
    check_adapter_base,
    model_identity,
)
from cxr_node.store import Store

LABEL_F1 = "label F1 micro (14)"
HELDOUT_MANIFEST = Path("training") / "heldout.jsonl"


class PromoteError(Exception):
    """The adapter cannot be judged at all (no folder, or the node's state is not writable)."""


@dataclass
class Decision:
    adapter: str
    files: str
    accepted: bool = False
    reasons: list[str] = field(default_factory=list)
    service: HeldOut | None = None
    candidate: HeldOut | None = None

    def scores(self) -> dict[str, Any]:
        return {side: {"model": h.model, "studies": h.studies, LABEL_F1: h.scores.get(LABEL_F1),
                       "significant_misses": h.significant_misses}
                for side, h in (("service", self.service), ("candidate", self.candidate)) if h}


def promote(config: Config, adapter_dir: Path, progress: IO[str] | None = None,
            remeasure: bool = False) -> Decision:
    """Judge the adapter in `adapter_dir` against the model `config` serves; record the decision.

    `remeasure`: evaluate both models now, whatever the card says (the card is as trustworthy as
    whoever can write the adapter's folder)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise PromoteError(f"{adapter_dir} is not a folder")
    try:
        files = adapter_digest(adapter_dir)
    except OSError as exc:
        raise PromoteError(f"{adapter_dir}: cannot read ({exc.strerror})") from None
    decision = Decision(_label(adapter_dir, files), files)
    try:
        _judge(config, adapter_dir, decision, progress, remeasure)
    except (CardError, IdentityError) as exc:
        decision.reasons.append(str(exc))
    decision.accepted = not decision.reasons
    _record(config, decision)
    return decision


def _label(adapter_dir: Path, files: str) -> str:
    """The adapter's label as its SRs would give it; from the folder alone when its manifest is
    unreadable (the decision is still recorded, as a refusal)."""
    try:
        return adapter_label(adapter_dir)
    except IdentityError:
        return f"{adapter_dir.resolve().name}@{files[:12]}"


def _judge(config: Config, adapter_dir: Path, decision: Decision, progress: IO[str] | None,
           remeasure: bool) -> None:
    card = read_card(adapter_dir)
    if card is None:
        decision.reasons.append(f"{adapter_dir} has no adapter card: only an adapter trained by "
                                "`cxr-node train` has held-out scores to judge it by")
        return
    check_adapter_base(adapter_dir, config.model_path)
    if "adapter" not in card.heldout:
        decision.reasons.append("the card has no held-out scores (trained with --no-eval)")
        return
    candidate_model = config.model.model_copy(update={"adapter": adapter_dir})
    measured = {} if remeasure else card.heldout
    decision.candidate = _scores(config, candidate_model, measured.get("adapter"), adapter_dir,
                                 "candidate", progress)
    decision.service = _scores(config, config.model, measured.get("base"), adapter_dir,
                               "service", progress)
    margins = config.adaptation.promote
    service_f1 = decision.service.scores.get(LABEL_F1) or 0.0
    candidate_f1 = decision.candidate.scores.get(LABEL_F1) or 0.0
    if service_f1 - candidate_f1 > margins.max_label_f1_drop + 1e-12:
        decision.reasons.append(
            f"{LABEL_F1} {candidate_f1:.4f} against {service_f1:.4f} for the model in service: a "
            f"drop of {service_f1 - candidate_f1:.4f}, more than "
            f"adaptation.promote.max_label_f1_drop ({margins.max_label_f1_drop})")
    added = decision.candidate.significant_misses - decision.service.significant_misses
    if added > margins.max_added_significant_misses:
        decision.reasons.append(
            f"{decision.candidate.significant_misses} held-out reports with a significant miss "
            f"against {decision.service.significant_misses} for the model in service: {added} "
            f"more, more than adaptation.promote.max_added_significant_misses "
            f"({margins.max_added_significant_misses})")


def _scores(config: Config, model: Any, measured: HeldOut | None, adapter_dir: Path, side: str,
            progress: IO[str] | None) -> HeldOut:
    """The model's held-out scores: the card's when it measured this very model, else a run now."""
    try:
        identity = model_identity(model, config.model_path)
    except OSError as exc:
        raise IdentityError(f"the model in {config.model_path} cannot be read here "
                            f"({exc.strerror}): run promote where the workers' model is") from None
    if measured is not None and measured.fingerprint == identity.fingerprint:
        return measured
    from cxr_node.evaluation.run import RunError, RunRequest, evaluate

    manifest = adapter_dir / HELDOUT_MANIFEST
    if not manifest.is_file():
        raise IdentityError(f"the {side} model is not the one the card measured, and the held-out "
                            f"studies ({manifest}) are not here to measure it")
    run = RunRequest(config.model_copy(update={"model": model}), manifest,
                     adapter_dir / "training" / f"eval-{side}-{identity.fingerprint[:12]}",
                     allow_outside=True)
    try:
        return HeldOut.from_summary(evaluate(run, progress))
    except RunError as exc:
        raise IdentityError(f"evaluating the {side} model on the held-out studies: {exc}") \
            from None


def _record(config: Config, decision: Decision) -> None:
    try:
        store = Store(config.database_path)
        with store.transaction() as db:
            db.execute("INSERT INTO promotions (adapter, files, accepted, reasons, decided_at, "
                       "operator) VALUES (?, ?, ?, ?, ?, ?)",
                       (decision.adapter, decision.files, int(decision.accepted),
                        json.dumps(decision.reasons), time.time(), audit.operator()))
        audit.open_trail(config.audit_path)
    except OSError as exc:
        raise PromoteError(f"cannot record the decision in {config.state_dir} "
                           f"({exc.strerror}): run promote as the node's user") from None
    audit.adapter_promotion(decision.adapter, decision.files, decision.accepted,
                            decision.reasons, decision.scores())


def unpromoted(config: Config, db: sqlite3.Connection | None) -> str | None:
    """Why the configured adapter may not be served, or None (no adapter, or accepted).
    ``db``: the node's state database (None: there is none yet)."""
    adapter = config.model.adapter
    if adapter is None:
        return None
    pinned = config.model.identity
    if pinned is not None:
        row = _last_decision(db, "adapter", pinned.adapter or "")
        what = f"the adapter model.identity names ({pinned.adapter})"
    else:
        try:
            files = adapter_digest(Path(adapter))
        except OSError:
            return None  # not readable here: the node cannot vouch for the model, drafts are DEMO
        row = _last_decision(db, "files", files)
        what = f"the adapter in {adapter}"
    if row is not None and row[0]:
        return None
    verdict = "was refused by" if row is not None else "has not passed"
    return (f"model.adapter: {what} {verdict} `cxr-node model promote`; promote it (it must "
            "score at least as well as the model in service on its held-out studies), or "
            "remove model.adapter")


def _last_decision(db: sqlite3.Connection | None, column: str, value: str) -> tuple[int] | None:
    if db is None:
        return None
    try:
        return db.execute(f"SELECT accepted FROM promotions WHERE {column} = ? "  # noqa: S608
                          "ORDER BY id DESC LIMIT 1", (value,)).fetchone()
    except sqlite3.OperationalError:  # a database from before promotions existed
        return None


def promotion_note(config: Config) -> str | None:
    """For `cxr-node config check`: whether the configured adapter may be served, read from the
    node's state without changing it."""
    if config.model.adapter is None:
        return None
    path = config.database_path
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if path.is_file() else None
    try:
        why = unpromoted(config, db)
    except sqlite3.Error as exc:
        return f"adapter: cannot read the promotions in {path} ({exc})"
    finally:
        if db is not None:
            db.close()
    return f"adapter: {why}" if why else "adapter: accepted by `cxr-node model promote`"
