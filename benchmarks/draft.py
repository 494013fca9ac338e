"""Drafting speed and memory through the real worker code (workers.model.load_model + draft).

Every report generates exactly ``--tokens`` new tokens (min_new_tokens = max_new_tokens), so batch
sizes are compared on equal work. Requests are what the node sends: PNG images (frontal and
lateral by default) in DraftRequest dicts.

1. Batch sizes: one ``draft`` call of b requests, alternating b = 1, 4, 16 over the repeats;
   latency is the call's wall time (every report of a batch waits for the whole batch).
2. A queue of ``--queue`` studies drained with batch 1 and with batch N (alternating): what
   batching gains in reports/s.

Memory: peak RSS of this process for each batch size (the kernel's high-water mark, reset before
each call), and on CUDA torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/draft.py                  # demo model, CPU
    .venv/bin/python benchmarks/draft.py --quick          # smoke run, < 1 min
    .venv/bin/python benchmarks/draft.py --model DIR --quantization nf4 --device cuda
    .venv/bin/python benchmarks/draft.py --medgemma-shaped --quantization nf4 --device cuda
    .venv/bin/python benchmarks/draft.py --medgemma-shaped --shrink 16 --quantization nf4  # CPU

``--medgemma-shaped`` builds a random-weight Gemma 3 with MedGemma 4B's layer sizes (its public
config: text hidden 2560, 34 layers, 8 heads / 4 KV heads of 256, MLP 10240, vocabulary 262,208;
SigLIP vision tower 896 px, patch 14, hidden 1152, 27 layers, MLP 4304; 256 tokens per image),
saves it in bfloat16 (about 8.6 GB) and loads it back the way a worker does. ``--shrink K``
divides widths and depths by K (heads and the vocabulary stay) so the same path runs on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    MIB,
    add_common_options,
    alternating,
    machine_summary,
    median,
    positive_ints,
    progress,
    scratch,
    table,
    wait_for_quiet,
)

from workers.model import MANIFEST_NAME, ReportModel, load_model  # first: Hugging Face offline

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr_node.config import GenerationConfig, ModelConfig  # noqa: E402
from cxr_node.logs import configure_logging  # noqa: E402
from workers.payload import DraftRequest, encode_image  # noqa: E402

# MedGemma 4B (= Gemma 3 4B) as published in its config.json.
MEDGEMMA_TEXT = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                 "vocab_size": 262208, "sliding_window": 1024}
MEDGEMMA_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                   "num_attention_heads": 16, "image_size": 896, "patch_size": 14}
MEDGEMMA_IMAGE_TOKENS = 256


# --- models ------------------------------------------------------------------------------------


def build_medgemma_shaped(target: Path, shrink: int, device: str) -> Path:
    """A random-weight Gemma 3 of MedGemma 4B's shape (or 1/``shrink`` of it) saved to ``target``.

    The word-level demo tokenizer stands in for Gemma's (it cannot be downloaded here); the
    embedding and output layer keep the real vocabulary size, which is what costs compute.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from workers.demo import GEMMA3_CHAT_TEMPLATE, demo_processor

    if shrink < 1:
        raise ValueError(f"shrink must be at least 1, got {shrink}")
    tokenizer = demo_processor().tokenizer
    ids = tokenizer.convert_tokens_to_ids
    # 64 patches a side pooled to 16 x 16 = 256 tokens; a shrunk tower keeps a multiple of 16.
    patches = max(16, 64 // shrink // 16 * 16)
    image_size = patches * MEDGEMMA_VISION["patch_size"]
    # bitsandbytes' 4-bit CPU kernels take layers whose input width is a multiple of 64.
    text = Gemma3TextConfig(
        **{**MEDGEMMA_TEXT,
           "hidden_size": max(64, MEDGEMMA_TEXT["hidden_size"] // shrink // 64 * 64),
           "intermediate_size": max(64, MEDGEMMA_TEXT["intermediate_size"] // shrink // 64 * 64),
           "num_hidden_layers": max(2, MEDGEMMA_TEXT["num_hidden_layers"] // shrink),
           "head_dim": max(16, MEDGEMMA_TEXT["head_dim"] // shrink)},
        query_pre_attn_scalar=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0}},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")],
    )
    vision = SiglipVisionConfig(
        **{**MEDGEMMA_VISION,
           "hidden_size": max(64, MEDGEMMA_VISION["hidden_size"] // shrink // 16 * 16),
           "intermediate_size": MEDGEMMA_VISION["intermediate_size"] // shrink,
           "num_hidden_layers": max(1, MEDGEMMA_VISION["num_hidden_layers"] // shrink),
           "image_size": image_size},
        vision_use_head=False,
    )
    config = Gemma3Config(text_config=text, vision_config=vision,
                          mm_tokens_per_image=MEDGEMMA_IMAGE_TOKENS,
                          boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MEDGEMMA_IMAGE_TOKENS)
    started = time.perf_counter()
    with torch.device(device):  # random init on the GPU when there is one: minutes faster
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)
    name = "MedGemma-4B-shaped (random weights)" + (f" / {shrink}" if shrink > 1 else "")
    manifest = {"name": name, "version": "bench", "demo": True}
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    progress(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
             f"in {time.perf_counter() - started:.0f} s")
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return target


def model_dir(args: argparse.Namespace, work: Path) -> Path:
    """The folder given, or a model built for this run in ``work``."""
    if args.model is not None:
        return args.model
    if args.medgemma_shaped:
        build_on = "cuda" if args.device == "cuda" else "cpu"
        return build_medgemma_shaped(work / "medgemma-shaped", args.shrink, build_on)
    from workers.demo import build_demo_model

    return build_demo_model(work / "demo-model")


# --- requests and measurements -----------------------------------------------------------------


def requests(count: int, views: Sequence[str], side: int) -> list[dict[str, Any]]:
    """DraftRequest dicts as the node sends them: 8-bit PNGs, longest side ``side``."""
    rng = np.random.default_rng(7)
    gradient = np.linspace(0, 200, side, dtype=np.float32)[None, :]
    out = []
    for index in range(count):
        images = []
        for view in views:
            pixels = (gradient + rng.normal(0, 20, (side, side))).clip(0, 255).astype(np.uint8)
            images.append(encode_image(pixels, view, side))
        out.append(DraftRequest(request_id=f"bench-{index}", images=tuple(images)).to_dict())
    return out


def reset_peak_memory(device: str) -> None:
    """Start a new high-water mark: the kernel's VmHWM (clear_refs 5), and CUDA's counter."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> tuple[float, float | None]:
    """(peak RSS MiB, peak CUDA allocated MiB or None) since the last reset."""
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    cuda = torch.cuda.max_memory_allocated() / MIB if device.startswith("cuda") else None
    return hwm * 1024 / MIB, cuda


@dataclass(frozen=True)
class Call:
    batch: int
    seconds: float
    generate_seconds: float
    new_tokens: float
    rss_mib: float
    cuda_mib: float | None


def draft_once(model: ReportModel, batch: list[dict[str, Any]]) -> Call:
    """One ``draft`` call (one batched generate), timed, with its peak memory."""
    reset_peak_memory(model.device)
    started = time.perf_counter()
    results = model.draft(batch)
    seconds = time.perf_counter() - started
    rss, cuda = peak_memory(model.device)
    timings = results[0]["timings"]
    return Call(len(batch), seconds, float(timings["generate_seconds"]),
                sum(r["timings"]["new_tokens"] for r in results) / len(results), rss, cuda)


def drain(model: ReportModel, queue: list[dict[str, Any]], batch: int) -> float:
    """Seconds to draft every request in ``queue``, ``batch`` at a time."""
    started = time.perf_counter()
    for start in range(0, len(queue), batch):
        model.draft(queue[start:start + batch])
    return time.perf_counter() - started


def quietly(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` once the machine is quiet (other sessions' tests would skew the timing)."""
    busy = wait_for_quiet()
    result = fn()
    progress(f"{what} (machine {busy:.0%} busy before)")
    return result


# --- runs and report --------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    model: ReportModel
    seconds: float
    rss_mib: float
    cuda_mib: float | None


def load(args: argparse.Namespace, folder: Path) -> Loaded:
    """The model as a worker loads it, with fixed-length generation."""
    config = ModelConfig(
        path=folder, device=args.device, quantization=args.quantization, dtype=args.dtype,
        image_size=args.image_side,
        generation=GenerationConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens))
    reset_peak_memory(args.device)
    started = time.perf_counter()
    model = load_model(config, folder)
    seconds = time.perf_counter() - started
    return Loaded(model, seconds, *peak_memory(args.device))


def run(args: argparse.Namespace, model: ReportModel,
        pool: list[dict[str, Any]]) -> tuple[dict[int, list[Call]], dict[int, list[float]]]:
    """Batch-size calls and queue drains, each set in alternating order."""
    draft_once(model, pool[:1])  # warm-up: first-call allocations and lazy initialisation
    calls: dict[int, list[Call]] = defaultdict(list)
    for _, batch in alternating(args.batches, args.repeats):
        calls[batch].append(quietly(f"batch {batch}", lambda b=batch: draft_once(model, pool[:b])))
    drains: dict[int, list[float]] = defaultdict(list)
    for _, batch in alternating(sorted({1, max(args.batches)}), args.queue_repeats):
        drains[batch].append(quietly(f"queue of {args.queue}, batch {batch}",
                                     lambda b=batch: drain(model, pool[:args.queue], b)))
    return calls, drains


def report(args: argparse.Namespace, loaded: Loaded, views: Sequence[str],
           calls: dict[int, list[Call]], drains: dict[int, list[float]]) -> str:
    model, cuda = loaded.model, args.device == "cuda"
    rows: list[list[Any]] = []
    for batch, group in sorted(calls.items()):
        seconds = median([c.seconds for c in group])
        rows.append([f"batch {batch}", len(group), seconds,
                     median([c.generate_seconds for c in group]), batch / seconds,
                     f"{median([c.new_tokens for c in group]):g}",
                     round(max(c.rss_mib for c in group)),
                     round(max(c.cuda_mib or 0 for c in group)) if cuda else "-"])
    reference = median(drains[1])
    for batch, seconds_list in sorted(drains.items()):
        seconds = median(seconds_list)
        gain = f" ({reference / seconds:.1f}x batch 1)" if batch != 1 else ""
        rows.append([f"queue of {args.queue}, batch {batch}{gain}", len(seconds_list), seconds,
                     "-", args.queue / seconds, args.tokens, "-", "-"])
    identity = model.identity
    params = sum(p.numel() for p in model.model.parameters()) / 1e6  # nf4/int8: packed count
    dtype = str(model.model.dtype).removeprefix("torch.")
    memory = f"peak RSS {loaded.rss_mib:.0f} MiB" + (
        f", CUDA {loaded.cuda_mib:.0f} MiB" if cuda else "")
    title = (f"Drafting: {identity.name} ({identity.architecture}, {params:.3g} M parameters, "
             f"quantization {args.quantization}, {model.device}, {dtype}), {len(views)} image(s) "
             f"per study of {args.image_side} px, {args.tokens} new tokens each; loaded in "
             f"{loaded.seconds:.2f} s ({memory}); torch threads {torch.get_num_threads()}; "
             f"{machine_summary()}")
    return table(["run", "calls", "seconds (median)", "generate s", "reports/s", "new tokens",
                  "peak RSS MiB", "peak CUDA MiB"], rows, title)


# --- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the demo model, built in the scratch folder)")
    parser.add_argument("--medgemma-shaped", action="store_true",
                        help="build and use a random-weight model of MedGemma 4B's shape")
    parser.add_argument("--shrink", type=int, default=1,
                        help="with --medgemma-shaped: divide widths and depths by this (CPU check)")
    parser.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        default="auto")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per report (default 32)")
    parser.add_argument("--batches", type=positive_ints, default=[1, 4, 16],
                        help="batch sizes to time (default 1,4,16)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per batch size (default 5)")
    parser.add_argument("--queue", type=int, default=64,
                        help="studies in the queue run (default 64)")
    parser.add_argument("--queue-repeats", type=int, default=2,
                        help="drains per batch size (default 2)")
    parser.add_argument("--views", default="PA,LATERAL",
                        help="images per study (default PA,LATERAL)")
    parser.add_argument("--image-side", type=int, default=512,
                        help="side of the PNGs in a request (default 512; the node sends at most "
                             "model.image_size)")
    args = parser.parse_args(argv)
    if args.model is not None and args.medgemma_shaped:
        parser.error("--model and --medgemma-shaped exclude each other")
    if args.quick:
        args.tokens, args.repeats, args.queue, args.queue_repeats = 8, 1, 8, 1
        args.batches = [b for b in args.batches if b <= 4] or [1]
    views = [v.strip().upper() for v in args.views.split(",") if v.strip()]
    configure_logging("WARNING", False)  # the worker logs every batch at INFO
    with scratch(args, "cxr-bench-draft-") as work:
        loaded = load(args, model_dir(args, work))
        pool = requests(max(max(args.batches), args.queue), views, args.image_side)
        calls, drains = run(args, loaded.model, pool)
    print(report(args, loaded, views, calls, drains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
