"""The `cxr-node` command: one entry point for hospital IT, with subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cxr_node.config import (
    Config,
    ConfigError,
    default_config_path,
    effective_config,
    load_config,
    reference,
)

if TYPE_CHECKING:
    from cxr_node.destinations.dicom import DicomStore

# `send` and `echo` talk to the single-machine node unless told otherwise.
PEER_DEFAULTS = ("127.0.0.1", 11112, "CXR_NODE")
CALLING_AE_TITLE = "CXR_SEND"
OPTIONS = {"host": "--host", "port": "--port", "ae_title": "--aet",
           "calling_ae_title": "--calling-aet", "timeout_seconds": "--timeout"}


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from cxr_node.adaptation.promote import unpromoted
    from cxr_node.logs import configure_logging
    from cxr_node.node import Node, build_stages
    from cxr_node.store import Store
    from cxr_node.tls import check_tls_files

    config = _config(args)
    check_tls_files(config)  # a wrong certificate or key is a configuration error, found now
    configure_logging(config.logging.level, config.logging.phi)
    store = Store(config.database_path)
    refused = unpromoted(config, store.db)
    if refused:
        raise ConfigError([f"{config.source}: {refused}"])
    return Node(config, build_stages(config, store)).run()


def cmd_worker(args: argparse.Namespace) -> int:
    from cxr_node.logs import configure_logging
    from workers.tasks import run_worker

    config = _config(args)
    configure_logging(config.logging.level, config.logging.phi)
    run_worker(config, concurrency=args.concurrency, hostname=args.hostname)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from cxr_node.adaptation.promote import promotion_note
    from cxr_node.identity import identity_notes

    config = load_config(args.file)
    print(f"{args.file}: OK", file=sys.stderr)
    for line in [*identity_notes(config), promotion_note(config)]:
        if line:
            print(line, file=sys.stderr)
    if not args.connect:
        print(yaml.safe_dump(effective_config(config), sort_keys=False), end="")
        return 0
    from cxr_node.send import check_connections

    failed = 0
    for ok, line in check_connections(config):
        print(("ok      " if ok else "FAILED  ") + line)
        failed += not ok
    print(f"connections: {'all ok' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


def _peer(args: argparse.Namespace) -> DicomStore:
    """Who `send` and `echo` talk to: the options given, else the node of --config, else the
    defaults (the single-machine node)."""
    from pydantic import ValidationError

    from cxr_node.destinations.dicom import DicomDestination, DicomStore

    host, port, ae_title = PEER_DEFAULTS
    if args.config is not None:
        node = load_config(args.config).node
        if node.tls is not None:
            raise ConfigError([f"{args.config}: node.tls: the node takes DICOM TLS only, and "
                               f"cxr-node {args.command} speaks plain DICOM; give --host/--port "
                               "of a plain port, or use dcmtk's storescu/echoscu with +tls"])
        host = "127.0.0.1" if node.host in ("0.0.0.0", "::") else node.host
        port, ae_title = node.port, node.ae_title
    given = {"host": args.host or host, "port": args.port or port,
             "ae_title": args.aet or ae_title, "calling_ae_title": args.calling_aet,
             "timeout_seconds": args.timeout}
    try:
        destination = DicomDestination(name="command line", **given)
    except ValidationError as exc:
        raise UsageError([f"{OPTIONS[str(e['loc'][0])]} '{given[str(e['loc'][0])]}': "
                          f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]) from None
    return DicomStore(destination, args.calling_aet)


def cmd_send(args: argparse.Namespace) -> int:
    from cxr_node.send import send

    tally = send(_peer(args), args.paths)
    print(tally.summary())
    return 0 if tally.ok else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from cxr_node.destinations.dicom import echo

    ok, line = echo(_peer(args))
    print(line)
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from cxr_node.store import Store

    config = _config(args)
    store = Store(config.database_path)
    counts = store.counts_by_state()
    print("studies: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    rows = [
        (s.study_key, s.state.value, str(s.revision), str(len(store.instances(s.study_uid))),
         _age(s.last_received_at), _age(s.state_changed_at), s.reason or "")
        for s in store.studies(limit=args.limit)
    ]
    _table(["study", "state", "rev", "images", "last image", "in state", "reason"], rows)
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    from cxr_node.dispatch import OutboxRow, outbox_rows
    from cxr_node.store import Store

    rows = outbox_rows(Store(_config(args).database_path), args.state or None)
    if not rows:
        print("outbox: nothing waiting or failed")
        return 0
    now = time.time()
    _table(OutboxRow.COLUMNS, [r.cells(now) for r in rows])
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from cxr_node.audit import open_trail
    from cxr_node.dispatch import requeue
    from cxr_node.store import Store

    if (args.id is None) == (not args.all_failed):
        print("give an outbox row ID or --all-failed", file=sys.stderr)
        return 2
    config = _config(args)
    open_trail(config.audit_path)  # an admin's requeue is part of the study's history
    count = requeue(Store(config.database_path), row_id=args.id, all_failed=args.all_failed)
    print(f"requeued {count} report(s); the running node sends them within seconds")
    return 0 if count else 1


def cmd_redraft(args: argparse.Namespace) -> int:
    from cxr_node import audit
    from cxr_node.store import Store, StudyState

    config = _config(args)
    store = Store(config.database_path)
    study = store.study(args.study)
    if study is None:
        print(f"no study {args.study!r}", file=sys.stderr)
        return 2
    if study.state not in (StudyState.FAILED, StudyState.SKIPPED):
        print(f"study {study.study_key} is {study.state}; only failed or skipped studies are "
              "drafted again", file=sys.stderr)
        return 1
    reason = f"drafted again by an administrator (was {study.state})"
    if not store.move(study, StudyState.STABLE, reason=reason):
        print(f"study {study.study_key} changed meanwhile; look again", file=sys.stderr)
        return 1
    audit.open_trail(config.audit_path)
    audit.study_state(study, StudyState.STABLE, reason, by=audit.operator())
    print(f"study {study.study_key} queued for drafting again")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from cxr_node import audit
    from cxr_node.retention import Retention, describe
    from cxr_node.store import Store

    config = _config(args)
    retention = Retention(config, Store(config.database_path))
    now = time.time()
    plan = retention.plan(now)
    if not plan:
        print("purge: nothing is due under the retention policy")
        return 0
    _table(["what", "study", "finished", "files", "size"], list(describe(plan, now)))
    if args.dry_run:
        print("dry run: nothing was deleted")
        return 0
    audit.open_trail(config.audit_path)  # each purge is part of the trail, with who ran it
    done = retention.apply(plan, by=audit.operator())
    due = len(plan)
    print(f"purged {done} of {due}" + ("" if done == due else
                                      "; the others changed meanwhile and wait to be due again"))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from cxr_node.audit import history_rows, study_history

    path = _config(args).audit_path
    if not path.exists():
        print(f"{path}: no audit trail yet", file=sys.stderr)
        return 1
    found = study_history(path, args.study, since=args.since)
    if found.torn:
        print(f"note: {found.torn} unreadable line(s) skipped (cut by a crash)", file=sys.stderr)
    if not found.records:
        print(f"no audit record for study {args.study}", file=sys.stderr)
        return 1
    first = found.records[0]
    uid = f"  {first['study_uid']}" if args.phi else ""
    print(f"study {first['study_key']}{uid}  ({len(found.records)} events, UTC)")
    _table(["time", "event", "detail"], list(history_rows(found.records, uids=args.phi)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxr_node.show import render_sr

    try:
        ds = pydicom.dcmread(args.file, force=True)
    except (OSError, InvalidDicomError) as exc:
        print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
        return 2
    print(render_sr(ds, phi=args.phi), end="")
    return 0


def cmd_model_demo(args: argparse.Namespace) -> int:
    from workers.demo import build_demo_model

    try:
        path = build_demo_model(args.dir)
    except FileExistsError:
        print(f"{args.dir} exists; give a new directory", file=sys.stderr)
        return 2
    print(f"demo model (random weights, NOT clinical) written to {path}")
    return 0


def cmd_model_identity(args: argparse.Namespace) -> int:
    """The model.identity block of this host's model, for a node whose workers run elsewhere."""
    from cxr_node.identity import IdentityError, model_identity

    config = _config(args)
    try:
        identity = model_identity(config.model, config.model_path)
    except (IdentityError, OSError) as exc:
        print(f"{config.model_path}: no model identity ({exc})", file=sys.stderr)
        return 2
    print(f"# {identity.description}: put this in the node's configuration")
    print(yaml.safe_dump({"model": {"identity": identity.model_dump()}}, sort_keys=False), end="")
    return 0


def cmd_model_promote(args: argparse.Namespace) -> int:
    from cxr_node.adaptation.promote import LABEL_F1, PromoteError, promote
    from cxr_node.logs import configure_logging

    configure_logging("WARNING")
    config = _config(args)
    try:
        decision = promote(config, args.adapter, remeasure=args.remeasure)
    except PromoteError as exc:
        print(f"cxr-node model promote: {exc}", file=sys.stderr)
        return 2
    if decision.service and decision.candidate:
        rows = [(name, _score(getter(decision.service)), _score(getter(decision.candidate)))
                for name, getter in ((LABEL_F1, lambda h: h.scores.get(LABEL_F1)),
                                     ("significant misses", lambda h: h.significant_misses),
                                     ("ROUGE-L", lambda h: h.scores.get("ROUGE-L")),
                                     ("held-out studies", lambda h: h.studies))]
        _table(["held-out score", f"in service: {decision.service.model}",
                f"candidate: {decision.candidate.model}"], rows)
    if decision.accepted:
        print(f"ACCEPTED {decision.adapter}: set model.adapter to {args.adapter} in the "
              "configuration of the node and the workers, then restart them")
        return 0
    print(f"REFUSED {decision.adapter}:")
    for reason in decision.reasons:
        print(f"  {reason}")
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    from cxr_node.adaptation.pairs import PairsError
    from cxr_node.adaptation.split import SplitError
    from cxr_node.evaluation.datasets import DatasetError
    from cxr_node.logs import configure_logging
    from workers.training import TrainError, TrainRequest, TrainSettings, train

    configure_logging("INFO")
    config = load_config(args.config or default_config_path()) if args.config or \
        args.from_node else Config()
    model = config.model.model_copy(update={"path": args.base, **(
        {"device": args.device} if args.device else {})})
    settings = TrainSettings(
        quantization=args.quantization, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        learning_rate=args.learning_rate, epochs=args.epochs, accumulate=args.accumulate,
        warmup_steps=args.warmup_steps, projector_steps=args.projector_steps,
        projector_learning_rate=args.projector_learning_rate,
        heldout_fraction=args.heldout_fraction, seed=args.seed,
        max_target_tokens=args.max_target_tokens)
    request = TrainRequest(config.model_copy(update={"model": model}), args.out, args.data,
                           settings, args.checkpoint_every, not args.no_eval, args.name,
                           args.allow_outside_paths)
    try:
        card = train(request)
    except (TrainError, DatasetError, SplitError, PairsError) as exc:
        print(f"cxr-node train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-node train: stopped; the same command resumes from the last checkpoint in "
              f"{args.out}", file=sys.stderr)
        return 130
    print(card.model_dump_json(indent=2))
    print(f"adapter {card.name}@{card.version} written to {args.out}; judge it with "
          f"`cxr-node model promote {args.out}`", file=sys.stderr)
    return 0


def cmd_corpus_build(args: argparse.Namespace) -> int:
    from cxr_node.adaptation.corpus import CorpusError, build_covid_corpus, summary_lines

    try:
        corpus = build_covid_corpus(args.collection, args.out, args.allow_non_commercial,
                                    args.table)
    except CorpusError as exc:
        print(f"cxr-node corpus build: {exc}", file=sys.stderr)
        return 2
    for line in summary_lines(corpus):
        print(line)
    print(f"manifest {args.out / 'corpus.jsonl'}; records left out and why in "
          f"{args.out / 'corpus-report.json'}; ATTRIBUTION.md names each kept record's origin",
          file=sys.stderr)
    return 0


def cmd_eval_score(args: argparse.Namespace) -> int:
    from cxr_node.evaluation import label, label_scores, text_scores
    from cxr_node.evaluation.jsonl import InputError, paired

    try:
        pairs = paired(args.refs, args.hyps)
    except InputError as exc:
        print(f"cxr-node eval score: {exc}", file=sys.stderr)
        return 2
    scores = text_scores(pairs.references, pairs.drafts) + label_scores(
        [label(t) for t in pairs.references], [label(t) for t in pairs.drafts])
    if args.json:
        print(json.dumps({"reports": len(pairs.ids), "scores": [s.as_dict() for s in scores]},
                         indent=2))
        return 0
    print(f"{len(pairs.ids)} reports: drafts {args.hyps} against references {args.refs}")
    _table(["score", "value", "note"],
           [(s.name, "-" if s.value is None else f"{s.value:.4f}", s.note) for s in scores])
    print("definitions:")
    for definition in dict.fromkeys(s.implementation for s in scores):
        names = ", ".join(s.name for s in scores if s.implementation == definition)
        print(f"  {names}: {definition}")
    return 0


def cmd_eval_label(args: argparse.Namespace) -> int:
    from cxr_node.evaluation import label
    from cxr_node.evaluation.jsonl import InputError, records

    bad = 0
    try:
        for record in records(sys.stdin.buffer, "stdin"):
            if isinstance(record, InputError):
                print(f"cxr-node eval label: {record}", file=sys.stderr)
                bad += 1
            else:
                print(json.dumps({"id": record.id, **label(record.text)}))
    except InputError as exc:
        print(f"cxr-node eval label: {exc}", file=sys.stderr)
        return 2
    return 1 if bad else 0


def cmd_eval_run(args: argparse.Namespace) -> int:
    from cxr_node.evaluation.datasets import DatasetError
    from cxr_node.evaluation.run import RunError, RunRequest, evaluate
    from cxr_node.evaluation.summary import SUMMARY_MD, markdown
    from cxr_node.logs import configure_logging

    configure_logging("WARNING")  # the progress bar is the output on stderr; problems still show
    config = load_config(args.config) if args.config is not None else Config()
    chosen = {"path": args.model, "adapter": args.adapter, "quantization": args.quantization,
              "device": args.device}
    model = config.model.model_copy(update={k: v for k, v in chosen.items() if v is not None})
    request = RunRequest(config.model_copy(update={"model": model}), args.data, args.out,
                         args.limit, args.grid_intensity, args.allow_outside_paths)
    try:
        summary = evaluate(request)
    except (DatasetError, RunError) as exc:
        print(f"cxr-node eval run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-node eval run: stopped; the same command resumes the run in {args.out}",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2) if args.json else markdown(summary).rstrip("\n"))
    print(f"written to {args.out} ({SUMMARY_MD}, summary.json, studies.csv, label-f1.png, "
          "results.jsonl)", file=sys.stderr)
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from cxr_node.evaluation.compare import CompareError, compare, markdown

    try:
        comparison = compare(args.run_a, args.run_b, args.resamples, args.seed,
                             jobs=args.jobs)
    except CompareError as exc:
        print(f"cxr-node eval compare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(comparison, indent=2) if args.json else markdown(comparison).rstrip("\n"))
    return 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
        return value
    return parse


def cmd_feedback_import(args: argparse.Namespace) -> int:
    """Signed reports from a file, kept for the running node to pair with its drafts."""
    from cxr_node import audit
    from cxr_node.feedback import imported, read_import, store_signed
    from cxr_node.show import printable
    from cxr_node.store import Store

    config = _config(args)
    store = Store(config.database_path)
    audit.open_trail(config.audit_path)  # who imported what is part of each study's history
    counts = {"stored": 0, "duplicate": 0, "problems": 0}
    try:
        for record in read_import(args.file, config.feedback):
            if isinstance(record, str):
                print(printable(record), file=sys.stderr)
                counts["problems"] += 1
                continue
            _, study, text = record
            outcome, _ = store_signed(store, imported(store.db, study, text), by=audit.operator())
            counts[outcome] += 1
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{counts['stored']} signed report(s) stored, {counts['duplicate']} imported before, "
          f"{counts['problems']} line(s) with a problem; the running node pairs them with their "
          "drafts within seconds (`cxr-node feedback status`)")
    return 1 if counts["problems"] else 0


def cmd_feedback_status(args: argparse.Namespace) -> int:
    from cxr_node.feedback import snapshot
    from cxr_node.show import printable
    from cxr_node.store import Store

    config = _config(args)
    shown = snapshot(Store(config.database_path), config.feedback, args.limit)
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    rolling, window = shown["rolling"], shown["window"]
    print(f"agreement over the last {rolling['pairs']} pair(s) (at most {window['max_pairs']}, "
          f"{window['days']:g} days):")
    for name in ("ROUGE-L", "BLEU-2", "label F1 micro (14)", "label F1 macro (14)",
                 "label F1 micro (5 common)", "label F1 macro (5 common)",
                 "significant miss share"):
        print(f"  {name + ':':<27}{_score(rolling[name])}")
    misses = ", ".join(f"{k} {v}" for k, v in rolling["significant misses"].items())
    print(f"  {'significant misses:':<27}{misses or 'none'}")
    print("signed reports: " + ", ".join(f"{k} {v}" for k, v in rolling["reports"].items()))
    rows = [(str(r["id"]), r["study"] or "-", r["source"], r["state"], _age(r["received_at"]),
             (r["model"] or "") + (" (DEMO)" if r["demo"] else ""), _score(r["ROUGE-L"]),
             _score(r["BLEU-2"]), _score(r["label F1"]), ", ".join(r["significant misses"]),
             printable(r["reason"] or "")) for r in shown["recent"]]
    _table(["id", "study", "source", "state", "received", "model", "ROUGE-L", "BLEU-2",
            "label F1", "significant misses", "reason"], rows)
    return 0


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class UsageError(ConfigError):
    """A command-line option with a bad value; one line per problem, naming the option."""


def _peer_options(p: argparse.ArgumentParser) -> None:
    host, port, ae_title = PEER_DEFAULTS
    p.add_argument("--host", help=f"the peer's address (default {host}, or the node of --config)")
    p.add_argument("--port", type=int, help=f"its DICOM port (default {port}, or from --config)")
    p.add_argument("--aet", metavar="AE_TITLE",
                   help=f"its AE title, the called AE (default {ae_title}, or from --config)")
    p.add_argument("--calling-aet", metavar="AE_TITLE", default=CALLING_AE_TITLE,
                   help=f"our AE title, as the peer sees it (default {CALLING_AE_TITLE})")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="connection, association and response timeout (default 30)")
    p.add_argument("--config", type=Path, default=None,
                   help="address the node this configuration describes (node.host, node.port, "
                        "node.ae_title)")


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=default_config_path(),
                   help="YAML configuration (default: $CXR_NODE_CONFIG or "
                        "/etc/cxr-node/cxr-node.yaml)")


def _since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO 8601 date or time such as 2025-03-01 or "
            "2025-03-01T14:30") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _age(then: float) -> str:
    seconds = max(0, time.time() - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-node", description="Draft preliminary chest X-ray reports next to a PACS."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if config:
            p.add_argument("--config", type=Path, default=default_config_path(),
                           help="YAML configuration (default: $CXR_NODE_CONFIG or "
                                "/etc/cxr-node/cxr-node.yaml)")
        p.set_defaults(func=func)
        return p

    command("serve", cmd_serve, "run the node: receive, assemble, draft, report, dispatch")
    p = command("send", cmd_send, "send DICOM files to a node or PACS (C-STORE), as a modality "
                "would: each in its own transfer syntax, decompressed only if the peer refuses "
                "it; one line per file; exit 1 if any was not stored", config=False)
    p.add_argument("paths", nargs="+", type=Path, metavar="FILE|DIR",
                   help="files, and folders whose files are all sent (non-DICOM ones skipped)")
    _peer_options(p)
    p = command("echo", cmd_echo, "check that a node or PACS answers (C-ECHO)", config=False)
    _peer_options(p)
    p = command("worker", cmd_worker, "run a drafting worker (one per GPU)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--hostname", default=None, help="Celery node name (default: cxr@host)")
    p = command("status", cmd_status, "show recent studies and their state")
    p.add_argument("--limit", type=int, default=30)

    p = command("outbox", cmd_outbox, "list draft reports waiting to be sent, or dead-lettered")
    p.add_argument("--state", action="append", choices=["pending", "sending", "dead", "delivered", "superseded"],
                   help="only rows in this state (repeatable); default: all but delivered")
    p = command("requeue", cmd_requeue, "send dead-lettered reports again")
    p.add_argument("id", nargs="?", type=int, help="outbox row id (from `cxr-node outbox`)")
    p.add_argument("--all-failed", action="store_true", help="every dead-lettered report")
    p = command("redraft", cmd_redraft, "draft a failed or skipped study again")
    p.add_argument("study", help="study key (from `cxr-node status`) or Study Instance UID")
    p = command("purge", cmd_purge, "delete what the retention policy says is due (images, "
                "draft SRs and rows of finished studies, old quarantine); the node also does it "
                "on its own every retention.interval_minutes")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p = command("audit", cmd_audit, "print one study's history from the audit trail")
    p.add_argument("--study", required=True, metavar="UID|KEY",
                   help="Study Instance UID, or the study key shown by `cxr-node status`")
    p.add_argument("--since", type=_since, metavar="TIME",
                   help="only events at or after this ISO 8601 time (UTC unless it says)")
    p.add_argument("--phi", action="store_true",
                   help="also show the UIDs the trail holds (study, instances, SRs)")
    p = command("show", cmd_show, "render a DICOM SR (ours or anyone's) as text", config=False)
    p.add_argument("file", type=Path)
    p.add_argument("--phi", action="store_true", help="also show patient name, ID and birth date")
    feedback = sub.add_parser("feedback", help="the signed reports the drafts are measured "
                              "against").add_subparsers(dest="what", required=True)
    p = feedback.add_parser(
        "import", help="signed reports from a file, JSON lines or CSV (.csv, header row) of "
                       '{"study": ..., "text": ...}: study is a Study Instance UID, a study key or '
                       "an accession number; the running node pairs each with its draft")
    p.add_argument("file", type=Path)
    _config_option(p)
    p.set_defaults(func=cmd_feedback_import)
    p = feedback.add_parser("status", help="agreement of the drafts with the signed reports over "
                                           "the rolling window, and the latest pairs (by study "
                                           "key, with their scores and significant misses)")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _config_option(p)
    p.set_defaults(func=cmd_feedback_status)
    model = sub.add_parser("model", help="model tools").add_subparsers(dest="what", required=True)
    p = model.add_parser("demo", help="build the tiny random-weight DEMO model (no download)")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_model_demo)
    p = model.add_parser("identity", help="print the model.identity block of the model this "
                                          "configuration loads (for the node, when workers run "
                                          "on another host)")
    p.add_argument("--config", type=Path, default=default_config_path(),
                   help="the workers' YAML configuration")
    p.set_defaults(func=cmd_model_identity)

    p = model.add_parser(
        "promote", help="judge an adapter trained by `cxr-node train` against the model in "
                        "service on its held-out studies; refuse it when it is worse by more "
                        "than adaptation.promote.*; the decision goes to the audit trail, and "
                        "the node serves only an accepted adapter (exit 0 accepted, 1 refused)")
    p.add_argument("adapter", type=Path, metavar="ADAPTER_DIR")
    p.add_argument("--remeasure", action="store_true",
                   help="evaluate both models on the held-out studies now instead of taking the "
                        "card's scores (which whoever can write the adapter folder can edit)")
    _config_option(p)
    p.set_defaults(func=cmd_model_promote)
    _train_parser(sub)
    corpus = sub.add_parser("corpus", help="training corpora from public case collections") \
        .add_subparsers(dest="what", required=True)
    p = corpus.add_parser(
        "build", help="a training manifest from a COVID-19 image data collection folder "
                      "(metadata.csv and images/): each record with its licence; records whose "
                      "licence does not allow training (none, ND, NC) are left out and listed")
    p.add_argument("collection", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new folder")
    p.add_argument("--table", type=Path, metavar="CSV",
                   help="the collection's table (default: DIR/metadata.csv)")
    p.add_argument("--allow-non-commercial", action="store_true",
                   help="also keep NC (non-commercial only) records: only for non-commercial use")
    p.set_defaults(func=cmd_corpus_build)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="what", required=True)
    p = cfg.add_parser("check", help="validate a configuration file and print it as the node sees it")
    p.add_argument("file", type=Path)
    p.add_argument("--connect", action="store_true",
                   help="instead of printing it, prove each connection: C-ECHO every DICOM "
                        "destination (with its TLS: the peer certificate's subject and expiry), "
                        "write to every folder destination, ask the broker; exit 1 if any fails")
    p.set_defaults(func=cmd_config_check)
    p = cfg.add_parser("reference", help="print every configuration key with default and meaning")
    p.set_defaults(func=lambda _args: print(reference(), end="") or 0)

    evaluation = sub.add_parser("eval", help="measure drafts against reference reports") \
        .add_subparsers(dest="what", required=True)
    text = ("score drafts against references: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, ReXrank's "
            "BLEU-2, label F1 and significant misses, each with its definition")
    p = evaluation.add_parser("score", help=text, description=text)
    p.add_argument("--refs", type=Path, required=True, metavar="FILE",
                   help='reference reports, JSON lines {"id": ..., "text": ...}')
    p.add_argument("--hyps", type=Path, required=True, metavar="FILE",
                   help="drafts, the same format; paired with the references by id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_eval_score)
    text = ('label reports (JSON lines {"id": ..., "text": ...} on standard input) with the 14 '
            "CheXpert observations: one JSON line each, 1 positive, 0 negative, -1 uncertain, "
            "null not mentioned; a bad line is named on standard error, and the exit status is 1")
    p = evaluation.add_parser("label", help=text, description=text)
    p.set_defaults(func=cmd_eval_label)
    p = evaluation.add_parser(
        "run", help="draft every study of a dataset with a model, as the node would, and score "
                    "the drafts; results are kept as they come, and the same command resumes "
                    "a stopped run")
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model folder")
    p.add_argument("--adapter", type=Path, metavar="DIR", help="peft LoRA adapter folder")
    p.add_argument("--quantization", choices=["nf4", "int8", "none"],
                   help="default: model.quantization of --config (nf4)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"],
                   help="default: model.device of --config (auto)")
    p.add_argument("--data", type=Path, required=True, metavar="MANIFEST|DIR",
                   help="a manifest of studies (.csv or .jsonl), or an IU X-ray folder (Open-i "
                        "NLMCXR_reports.tgz and the images)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN",
                   help="folder of the run: results.jsonl, summary.md/.json, studies.csv, "
                        "label-f1.png")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a node configuration: its prompt, generation, image and batch "
                        "settings and limits are used (default: the built-in defaults)")
    p.add_argument("--limit", type=_positive(int), metavar="N", help="only the first N studies")
    p.add_argument("--grid-intensity", type=_positive(float), metavar="G_PER_KWH",
                   help="CO2 of the grid in g/kWh, to give the CO2 of the energy measured")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let the manifest name images outside its folder (absolute or ../)")
    p.add_argument("--json", action="store_true",
                   help="print summary.json instead of the Markdown summary")
    p.set_defaults(func=cmd_eval_run)
    p = evaluation.add_parser(
        "compare", help="compare two runs on the studies both have: each score of A and B, "
                        "B - A and a paired bootstrap 95%% interval of it")
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    p.add_argument("--resamples", type=_positive(int), default=1000, metavar="N",
                   help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--jobs", type=_positive(int), metavar="N",
                   help="processes scoring the resamples (default: one per CPU for large runs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_eval_compare)
    return parser


def _train_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from cxr_node.adaptation.settings import TrainSettings

    defaults = TrainSettings()
    p = sub.add_parser(
        "train", help="fit a QLoRA adapter on a base model (peft + bitsandbytes nf4) with a "
                      "held-out split by patient, checkpoints that resume after a kill, and an "
                      "evaluation of base and adapter on the held-out studies; writes the "
                      "adapter, its card, and training/ (plan, loss log, checkpoints, runs)")
    p.add_argument("--base", type=Path, required=True, metavar="DIR", help="base model folder")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, metavar="MANIFEST",
                      help="a manifest (.csv or .jsonl, as for eval run; corpus build writes one)")
    data.add_argument("--from-node", action="store_true",
                      help="the studies the node drafted and holds signed reports for "
                           "(identifiers taken out of the text)")
    p.add_argument("--out", type=Path, required=True, metavar="ADAPTER_DIR")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the node's configuration: prompt, image and generation settings, "
                        "limits, state (--from-node); default: built-in defaults, or "
                        "$CXR_NODE_CONFIG / /etc/cxr-node/cxr-node.yaml with --from-node")
    p.add_argument("--name", help="the adapter's name in the SRs (default: ADAPTER_DIR's name)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    for option, kind, help in TRAIN_OPTIONS:
        p.add_argument(option, type=kind, default=getattr(defaults, _dest(option)),
                       help=f"{help} (default %(default)s)")
    p.add_argument("--quantization", choices=["nf4", "int8", "none"], default="nf4",
                   help="the base model's weights while training (default nf4: QLoRA)")
    p.add_argument("--checkpoint-every", type=_positive(int), default=50, metavar="STEPS")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the held-out evaluation (the adapter then cannot be promoted)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let the manifest name images outside its folder")
    p.set_defaults(func=cmd_train)


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


TRAIN_OPTIONS: tuple[tuple[str, Callable[[str], int | float], str], ...] = (
    ("--epochs", _positive(int), "passes over the training studies"),
    ("--learning-rate", _positive(float), "LoRA learning rate"),
    ("--accumulate", _positive(int), "studies per optimizer step (gradient accumulation)"),
    ("--rank", _positive(int), "LoRA rank"),
    ("--alpha", _positive(int), "LoRA alpha"),
    ("--dropout", float, "LoRA dropout"),
    ("--warmup-steps", int, "steps of linear warm-up"),
    ("--projector-steps", int, "steps of a first stage that trains only the projector (0: none)"),
    ("--projector-learning-rate", _positive(float), "the projector stage's learning rate"),
    ("--heldout-fraction", _positive(float), "share of patients held out"),
    ("--seed", int, "seed of the split, the order and the initial weights"),
    ("--max-target-tokens", _positive(int), "longest report learnt, in tokens"),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"cxr-node {args.command}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
