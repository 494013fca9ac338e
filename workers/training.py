"""`cxr-node train`: a QLoRA adapter for the base model, fitted on the site's own GPU.

The base model is loaded as the worker loads it (`load_base`: 4-bit nf4 by default, the vision
encoder and projector unquantized), and LoRA is put on the language model's attention and MLP
projections. An optional first stage trains only the multimodal projector (kept in the adapter),
to align the image features with a new kind of image before the language model adapts.

Each study is fed exactly as a live draft is: the node's image selection (frontal, then lateral),
the same PNG the task carries, the worker's prompt in the model's own conversation format. The
model learns the signed report as its turn (identifiers taken out), and only that turn counts in
the loss.

Everything the run needs to go on after a kill is under ``ADAPTER_DIR/training/``: the plan (a
resume with other data or settings is refused), the held-out split, the prepared studies, the
loss log, and checkpoints (adapter weights, optimizer state, random state; written whole or not
at all). The same command resumes at the last checkpoint and gives the same adapter as a run
never stopped. At the end the adapter is saved, and the base model and the adapter are evaluated
with `cxr-node eval run` on the held-out studies; the adapter card records both.
"""

from __future__ import annotations

from workers.model import LoadedBase, ModelLoadError, ReportModel, load_base  # first: HF offline

import gc  # noqa: E402, I001
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

import structlog  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cxr_node.adaptation.card import (  # noqa: E402
    AdapterCard,
    BaseModelRef,
    DataSource,
    HeldOut,
    TrainingData,
)
from cxr_node.adaptation.pairs import PAIRS, export_pairs  # noqa: E402
from cxr_node.adaptation.scrub import Scrubber  # noqa: E402
from cxr_node.adaptation.settings import TrainSettings  # noqa: E402
from cxr_node.adaptation.split import Split, patient_of, split_by_patient  # noqa: E402
from cxr_node.config import Config  # noqa: E402
from cxr_node.durable import fsync_dir, private_dir, private_opener, write_atomic  # noqa: E402
from cxr_node.evaluation.datasets import (  # noqa: E402
    Dataset,
    Study,
    StudyImages,
    load_dataset,
    write_manifest,
)
from cxr_node.evaluation.progress import Progress  # noqa: E402
from cxr_node.identity import CARD_NAME, MANIFEST_NAME, adapter_version, weights_checksum  # noqa: E402
from cxr_node.imaging import ImagingError  # noqa: E402
from workers.payload import DraftRequest, encode_image  # noqa: E402

log = structlog.get_logger(__name__)

TRAINING = "training"
PLAN, LOSS, PREPARED, TRAINED = "plan.json", "loss.jsonl", "prepared.jsonl", "trained.json"
TRAIN_MANIFEST, HELDOUT_MANIFEST, NODE_PAIRS = "train.jsonl", "heldout.jsonl", "node-pairs.json"
CHECKPOINTS, KEEP_CHECKPOINTS = "checkpoints", 2
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
MAX_GRAD_NORM = 1.0
PLAN_FORMAT = 1


class TrainError(Exception):
    """The run cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class TrainRequest:
    """`config`: the node's configuration; its model.path is the base model, and its prompt,
    image and generation settings are the ones drafts will use."""

    config: Config
    out: Path
    data: Path | None  # None: the node's own pairs (--from-node)
    settings: TrainSettings = TrainSettings()
    checkpoint_every: int = 50
    evaluate: bool = True
    name: str | None = None
    allow_outside: bool = False


@dataclass(frozen=True)
class _Entry:
    """A training study, prepared once: the request the worker would get, and the answer."""

    id: str
    request: dict[str, Any]
    target: str


def train(request: TrainRequest, progress: IO[str] | None = None) -> AdapterCard:
    """Train (or resume training) the adapter in `request.out`, evaluate it, write its card."""
    out = Path(request.out)
    if (out / CARD_NAME).exists():
        raise TrainError(f"{out} holds a trained adapter (it has {CARD_NAME}); give a new --out")
    base_dir = request.config.model_path
    if request.config.model.adapter is not None:
        raise TrainError("model.adapter is set in --config: an adapter is trained on the base "
                         "model alone; remove model.adapter")
    work = private_dir(out / TRAINING)
    dataset, removed = _dataset(request, work)
    split = split_by_patient(dataset.studies, request.settings.heldout_fraction,
                             request.settings.seed)
    _keep_same_plan(work / PLAN, _plan(request, dataset, base_dir))
    _write_split(work / TRAIN_MANIFEST, split.train)
    _write_split(work / HELDOUT_MANIFEST, split.heldout)
    entries, left_out, scrubbed = _prepare(request, split.train, work / PREPARED, progress)
    if not entries:
        raise TrainError(f"none of the {len(split.train)} training studies has a usable image")
    if (work / TRAINED).exists() and (out / WEIGHTS).exists():
        trained = json.loads((work / TRAINED).read_text())
        log.info("training.done_before", steps=trained["steps"])
    else:
        trained = _fit(request, entries, work, out, progress)
    identity = _write_identity(request, out)
    heldout = _evaluate(request, out, work, progress) if request.evaluate else {}
    card = AdapterCard(
        name=identity["name"], version=identity["version"],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        base=_base_ref(request.config, base_dir), demo=identity["demo"],
        data=_data_card(dataset, split, entries, left_out, removed + scrubbed),
        training={**asdict(request.settings), **trained}, heldout=heldout)
    card.write(out)
    return card


# -- data ---------------------------------------------------------------------------------------


def _dataset(request: TrainRequest, work: Path) -> tuple[Dataset, Counter[str]]:
    """The training data, and the identifiers the export removed (node pairs only)."""
    if request.data is not None:
        return load_dataset(request.data, request.allow_outside), Counter()
    record = work / NODE_PAIRS
    if not record.exists():  # exported once: the pseudonyms' key is gone after the export
        pairs = export_pairs(request.config, work)
        write_atomic(record, (json.dumps(pairs.as_dict(), indent=2) + "\n").encode())
        if pairs.left_out:
            log.info("training.pairs_left_out", **{k.replace(" ", "_"): v
                                                   for k, v in pairs.left_out.items()})
    exported = json.loads(record.read_text())
    if not exported["studies"]:
        raise TrainError(f"the node holds no paired study with images ({exported['left_out']}); "
                         "signed reports come with feedback.* (see docs/operations.md)")
    return (load_dataset(work / PAIRS, allow_outside=True),
            Counter(exported["identifiers_removed"]))


def _plan(request: TrainRequest, dataset: Dataset, base_dir: Path) -> dict[str, Any]:
    model = request.config.model
    return {"format": PLAN_FORMAT, "data": dataset.fingerprint,
            "base": weights_checksum(base_dir), "settings": asdict(request.settings),
            "drafting": {"prompt": model.prompt, "image_size": model.image_size,
                         "max_images": model.max_images}}


def _keep_same_plan(path: Path, plan: dict[str, Any]) -> None:
    if path.exists():
        before = json.loads(path.read_text())
        changed = [key for key in plan if before.get(key) != plan[key]]
        if changed:
            raise TrainError(f"{path.parent.parent} holds a run with other {', '.join(changed)}: "
                             "resume it with the data, base model and settings it was started "
                             "with, or give a new --out")
        return
    write_atomic(path, (json.dumps(plan, indent=2) + "\n").encode())


def _write_split(path: Path, studies: Sequence[Study]) -> None:
    """One side of the split as a manifest (absolute image paths), for the evaluation runs."""
    rows = []
    for study in studies:
        row = {"id": study.id, "patient_id": study.patient_id,
               "images": [{"path": str(i.path), **({"view": i.view.value} if i.view else {})}
                          for i in study.images],
               "findings": study.findings, "impression": study.impression, "day": study.day,
               "source": study.source, "licence": study.licence}
        rows.append({k: v for k, v in row.items() if v is not None})
    write_manifest(path, rows)


def target_text(study: Study) -> str:
    """The signed report as the model should write it: the headings the worker parses."""
    parts = [f"FINDINGS: {study.findings}" if study.findings else "",
             f"IMPRESSION: {study.impression}" if study.impression else ""]
    return "\n".join(p for p in parts if p)


def _prepare(request: TrainRequest, studies: Sequence[Study], path: Path,
             progress: IO[str] | None) -> tuple[list[_Entry], list[dict[str, str]], Counter[str]]:
    """Each training study's images, selected and encoded as the node does, kept in `path` as
    they are made (a resumed run does not decode them again)."""
    model = request.config.model
    done = _read_prepared(path)
    todo = [s for s in studies if s.id not in done]
    if todo:
        images = StudyImages(request.config.limits)
        bar = Progress(len(studies), "studies prepared", done=len(studies) - len(todo),
                       stream=progress)
        try:
            with open(path, "a", encoding="utf-8", opener=private_opener) as file:
                for study in todo:
                    try:
                        selection = images.select(study, model.image_size, model.max_images)
                        line: dict[str, Any] = {"id": study.id, "request": DraftRequest(
                            study.id, tuple(encode_image(i.pixels, i.view.value, model.image_size)
                                            for i in selection.images)).to_dict()}
                    except ImagingError as exc:
                        line = {"id": study.id, "error": f"no usable image: {exc}"}
                    file.write(json.dumps(line) + "\n")
                    file.flush()
                    done[study.id] = line
                    bar.advance()
                os.fsync(file.fileno())
        finally:
            bar.close()
            images.close()
    scrubber, removed = Scrubber(), Counter[str]()
    entries, left_out = [], []
    for study in studies:
        line = done[study.id]
        if "error" in line:
            left_out.append({"id": study.id, "reason": line["error"]})
            continue
        scrubbed = scrubber.scrub(target_text(study))
        removed.update(scrubbed.removed)
        entries.append(_Entry(study.id, line["request"], scrubbed.text))
    return entries, left_out, removed


def _read_prepared(path: Path) -> dict[str, dict[str, Any]]:
    """The prepared studies of an earlier start; a torn last line (a kill) is cut off."""
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    with path.open("r+b") as file:
        while True:
            offset, line = file.tell(), file.readline()
            if not line:
                break
            if not line.endswith(b"\n"):
                file.truncate(offset)
                break
            value = json.loads(line)
            done[value["id"]] = value
    return done


# -- fitting ------------------------------------------------------------------------------------


class _Stream:
    """Which example each micro-batch takes: every epoch a new order from the seed, so that a
    resumed run takes the same examples in the same order as one never stopped."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._epoch, self._order = -1, list(range(count))

    def example(self, micro: int) -> int:
        epoch = micro // self.count
        if epoch != self._epoch:
            self._epoch, self._order = epoch, list(range(self.count))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
        return self._order[micro % self.count]


def _fit(request: TrainRequest, entries: Sequence[_Entry], work: Path, out: Path,
         progress: IO[str] | None) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = request.settings
    torch.manual_seed(settings.seed)
    model_config = request.config.model.model_copy(
        update={"quantization": settings.quantization, "adapter": None})
    try:
        base = load_base(model_config, request.config.model_path)
    except ModelLoadError as exc:
        raise TrainError(str(exc)) from None
    drafting = ReportModel(base.model, base.processor, base.arch, base.identity, model_config,
                           base.device)
    base.processor.tokenizer.padding_side = "right"
    targets = _lora_targets(base)
    if settings.quantization != "none":
        model = prepare_model_for_kbit_training(
            base.model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = base.model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, task_type="CAUSAL_LM",
        modules_to_save=[base.arch.projector] if settings.projector_steps else None))
    model.peft_config["default"].base_model_name_or_path = base.identity.name
    per_epoch = math.ceil(len(entries) / settings.accumulate)
    total = settings.projector_steps + settings.epochs * per_epoch
    stream, prompt_lengths = _Stream(len(entries), settings.seed), dict[str, int]()
    start, optimizer_state = _resume(work, model)
    before = _last_logged(work / LOSS)  # the steps up to the checkpoint resumed from
    started, seconds_before = time.perf_counter(), before["seconds"] if before else 0.0
    bar = Progress(total, "steps", done=start, stream=progress)
    optimizer, stage = None, None
    model.train()
    try:
        with open(work / LOSS, "a", encoding="utf-8", opener=private_opener) as losses:
            for step in range(start, total):
                now = "projector" if step < settings.projector_steps else "lora"
                if now != stage:
                    stage = now
                    optimizer = _optimizer(model, stage, settings)
                    if optimizer_state is not None and optimizer_state["stage"] == stage:
                        optimizer.load_state_dict(optimizer_state["optimizer"])
                assert optimizer is not None
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(step, stage, settings, total)
                loss, tokens = 0.0, 0
                for micro in range(settings.accumulate):
                    entry = entries[stream.example(step * settings.accumulate + micro)]
                    batch = _encode(drafting, entry, prompt_lengths, settings.max_target_tokens)
                    output = model(**batch)
                    (output.loss / settings.accumulate).backward()
                    loss += output.loss.item() / settings.accumulate
                    tokens += int((batch["labels"] != -100).sum())
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.write(json.dumps({
                    "step": step + 1, "stage": stage, "loss": round(loss, 6),
                    "learning_rate": optimizer.param_groups[0]["lr"], "target_tokens": tokens,
                    "seconds": round(seconds_before + time.perf_counter() - started, 3)}) + "\n")
                losses.flush()
                bar.advance()
                if (step + 1) % request.checkpoint_every == 0 or step + 1 in (
                        settings.projector_steps, total):
                    _checkpoint(work, model, optimizer, step + 1, stage)
    finally:
        bar.close()
    trained = {"steps": total, "examples": len(entries), "lora_modules": len(targets),
               "trainable_parameters": sum(p.numel() for n, p in model.named_parameters()
                                           if "lora_" in n or "modules_to_save" in n),
               "final_loss": (_last_logged(work / LOSS) or {}).get("loss"),
               "seconds": round(seconds_before + time.perf_counter() - started, 1),
               "device": base.device, "peak_memory_mb": _peak_memory_mb(base.device)}
    _save_adapter(model, out)
    write_atomic(work / TRAINED, (json.dumps(trained, indent=2) + "\n").encode())
    del model, drafting, base, optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return trained


def _lora_targets(base: LoadedBase) -> list[str]:
    """The language model's attention and MLP projections (never the vision encoder's)."""
    vision = tuple(f"{m}." for m in base.arch.vision_modules)
    targets = sorted(name for name, _ in base.model.named_modules()
                     if name.rsplit(".", 1)[-1] in LORA_TARGETS and not name.startswith(vision))
    if not targets:
        raise TrainError(f"{base.arch.model_type}: no attention or MLP projection "
                         f"({', '.join(LORA_TARGETS)}) found in the language model")
    return targets


def _optimizer(model: torch.nn.Module, stage: str, settings: TrainSettings) -> torch.optim.AdamW:
    """The stage's parameters trainable, the others frozen, and a new AdamW over them."""
    marker = "modules_to_save" if stage == "projector" else "lora_"
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad = marker in name
        if parameter.requires_grad:
            trainable.append(parameter)
    rate = settings.projector_learning_rate if stage == "projector" else settings.learning_rate
    return torch.optim.AdamW(trainable, lr=rate, weight_decay=0.0)


def _learning_rate(step: int, stage: str, settings: TrainSettings, total: int) -> float:
    """Linear warm-up, then linear decay to a tenth, within each stage."""
    if stage == "projector":
        rate, first, length = settings.projector_learning_rate, 0, settings.projector_steps
    else:
        rate, first = settings.learning_rate, settings.projector_steps
        length = total - first
    done = step - first
    warm = min(1.0, (done + 1) / max(1, settings.warmup_steps))
    return rate * warm * (1.0 - 0.9 * done / max(1, length))


def _encode(drafting: ReportModel, entry: _Entry, prompt_lengths: dict[str, int],
            max_target_tokens: int) -> dict[str, torch.Tensor]:
    """The model inputs of one example, with labels on the answer's tokens only."""
    prompt, conversation, images = drafting.conversation(entry.request, entry.target)
    if not conversation.startswith(prompt):
        raise TrainError("the model's chat template renders the answer's turn differently from "
                         "the prompt alone: the prompt's tokens cannot be told from the answer's")
    processor = drafting.processor
    if entry.id not in prompt_lengths:
        prompt_lengths[entry.id] = processor(text=[prompt], images=[images],
                                             return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[conversation], images=[images], return_tensors="pt")
    inputs.pop("labels", None)
    length = min(inputs["input_ids"].shape[1], prompt_lengths[entry.id] + max_target_tokens)
    batch = {k: (v[:, :length] if k in ("input_ids", "attention_mask", "token_type_ids",
                                        "mm_token_type_ids") else v)
             for k, v in inputs.items()}
    labels = batch["input_ids"].clone()
    labels[:, : prompt_lengths[entry.id]] = -100
    batch["labels"] = labels
    model = drafting.model
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


# -- checkpoints --------------------------------------------------------------------------------


def _checkpoint(work: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                stage: str) -> None:
    """The trainable weights, optimizer and random state after `step`, whole or not at all."""
    from peft import get_peft_model_state_dict

    folder = private_dir(work / CHECKPOINTS)
    staging = folder / f".step-{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    private_dir(staging)
    weights = {k: v.detach().to("cpu").contiguous()
               for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, staging / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               staging / "optimizer.pt")
    write_atomic(staging / "state.json", json.dumps({"step": step, "stage": stage}).encode())
    for path in staging.iterdir():
        path.chmod(0o600)
        with path.open("rb") as file:
            os.fsync(file.fileno())
    os.rename(staging, folder / f"step-{step:06d}")
    fsync_dir(folder)
    for old in _checkpoints(work)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    log.info("training.checkpoint", step=step, stage=stage)


def _checkpoints(work: Path) -> list[Path]:
    folder = work / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-")
                  and (p / "state.json").exists())


def _resume(work: Path, model: torch.nn.Module) -> tuple[int, dict[str, Any] | None]:
    """The step to start at, and the optimizer state of the last checkpoint (None: a new run)."""
    from peft import set_peft_model_state_dict

    found = _checkpoints(work)
    if not found:
        (work / LOSS).unlink(missing_ok=True)
        return 0, None
    last = found[-1]
    state = json.loads((last / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(last / "adapter.safetensors"))
    saved = torch.load(last / "optimizer.pt", weights_only=True)  # tensors and numbers only
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    _cut_losses(work / LOSS, state["step"])
    log.info("training.resumed", step=state["step"], stage=state["stage"])
    return state["step"], {"stage": state["stage"], "optimizer": saved["optimizer"]}


def _cut_losses(path: Path, step: int) -> None:
    """Drop the loss lines of steps after the checkpoint: they are done again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(kept).encode())


def _last_logged(path: Path) -> dict[str, Any] | None:
    """The loss log's last step (a new run has none: `_resume` removed the log)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _save_adapter(model: Any, out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors in `out`, private to the user."""
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # peft's template; the card says what matters
    for name in (CONFIG, WEIGHTS):
        (out / name).chmod(0o600)


def _write_identity(request: TrainRequest, out: Path) -> dict[str, Any]:
    """cxr-model.json: the adapter's name and version as the SR's device identity gives them."""
    from cxr_node.identity import read_manifest

    base = read_manifest(request.config.model_path)
    day = datetime.now(UTC).strftime("%Y%m%d")
    identity = {"name": (request.name or out.resolve().name)[:40],
                "version": f"{day}-{adapter_version(out)}",
                "demo": bool(base.get("demo", False))}
    path = out / MANIFEST_NAME
    if path.exists():  # a resumed run keeps the identity it gave the adapter
        return {**identity, **read_manifest(out)}
    write_atomic(path, (json.dumps(identity, indent=2) + "\n").encode())
    return identity


# -- evaluation and card ------------------------------------------------------------------------


def _evaluate(request: TrainRequest, out: Path, work: Path,
              progress: IO[str] | None) -> dict[str, HeldOut]:
    """The base model and the adapter on the held-out studies, with the drafting settings."""
    from cxr_node.evaluation.run import RunError, RunRequest, evaluate

    found = {}
    for side, adapter in (("base", None), ("adapter", out)):
        model = request.config.model.model_copy(update={"adapter": adapter})
        run = RunRequest(request.config.model_copy(update={"model": model}),
                         work / HELDOUT_MANIFEST, work / f"eval-{side}", allow_outside=True)
        try:
            summary = evaluate(run, progress)
        except RunError as exc:
            raise TrainError(f"evaluating the {side} model on the held-out studies: {exc}") \
                from None
        found[side] = HeldOut.from_summary(summary)
    return found


def _base_ref(config: Config, base_dir: Path) -> BaseModelRef:
    from cxr_node.identity import model_identity

    identity = model_identity(config.model.model_copy(update={"adapter": None}), base_dir)
    return BaseModelRef(name=identity.name, version=identity.version,
                        architecture=identity.architecture, checksum=weights_checksum(base_dir))


def _data_card(dataset: Dataset, split: Split, entries: Sequence[_Entry],
               left_out: Sequence[dict[str, str]], removed: Counter[str]) -> TrainingData:
    used = {e.id for e in entries}
    studies = [s for s in split.train if s.id in used]
    days = sorted(s.day for s in studies if s.day)
    sources = Counter((s.source or dataset.layout, s.licence or "not stated") for s in studies)
    return TrainingData(
        studies=len(studies), patients=len({patient_of(s) for s in studies}),
        heldout_studies=len(split.heldout), heldout_patients=len(Split.patients(split.heldout)),
        left_out=len(left_out), first_day=days[0] if days else None,
        last_day=days[-1] if days else None,
        sources=[DataSource(source=s, licence=lic, studies=n)
                 for (s, lic), n in sorted(sources.items())],
        manifest_sha256=dataset.fingerprint, identifiers_removed=dict(removed))


__all__ = ["TrainError", "TrainRequest", "TrainSettings", "train"]
