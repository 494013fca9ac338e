"""Time and memory per training step of `cxr-node train` (QLoRA), through the real training code.

Each quantization of the base (``--quantizations nf4,none``) trains the same adapter for the same
steps on the same studies: the repository's four NIH images, each study a frontal and a lateral
view (the same picture twice: the cost is in the tokens, two images of 256 each for MedGemma), one
study per step (``--accumulate 1``), no held-out evaluation. The first ``WARMUP`` steps are left
out of the times.

    .venv/bin/python benchmarks/train_step.py                      # demo model, CPU
    .venv/bin/python benchmarks/train_step.py --medgemma-shaped --device cuda
    .venv/bin/python benchmarks/train_step.py --medgemma-shaped --shrink 16   # the same path on CPU

Peak memory: torch.cuda.max_memory_allocated on a GPU, else the process's peak RSS (which counts
the loading of the model too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import add_common_options, machine_summary, progress, scratch, table
from draft import model_dir

from workers.training import TrainRequest, TrainSettings, train  # first: Hugging Face offline

from cxr_node.config import Config  # noqa: E402
from cxr_node.logs import configure_logging  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NIH = REPO / "tests" / "data" / "nih-cxr14"
WARMUP = 2


def manifest(folder: Path, studies: int) -> Path:
    images = sorted(NIH.glob("*.png"))
    lines = []
    for n in range(studies):
        image = str(images[n % len(images)])
        lines.append(json.dumps({
            "id": f"s{n}", "patient_id": f"p{n}",
            "images": [{"path": image, "view": "PA"}, {"path": image, "view": "LATERAL"}],
            "findings": "The heart size is normal. The lungs are clear. No pleural effusion or "
                        "pneumothorax. The mediastinal contours are normal.",
            "impression": "No acute cardiopulmonary process."}) + "\n")
    path = folder / "manifest.jsonl"
    path.write_text("".join(lines))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--model", type=Path, help="a base model folder (default: the demo model)")
    parser.add_argument("--medgemma-shaped", action="store_true",
                        help="a random-weight Gemma 3 of MedGemma 4B's shape (see draft.py)")
    parser.add_argument("--shrink", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--quantizations", default="nf4,none")
    parser.add_argument("--steps", type=int, default=12, help="steps per quantization")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.steps = 4
    configure_logging("WARNING")
    rows = []
    with scratch(args, "cxr-train-bench-") as work:
        base = model_dir(args, work)
        data = manifest(work, args.steps + WARMUP)
        config = Config()
        size = json.loads((base / "processor_config.json").read_text())
        side = size.get("image_processor", size).get("size", {}).get("height", 896)
        for quantization in args.quantizations.split(","):
            progress(f"training {quantization}, {args.steps + WARMUP} steps")
            model = config.model.model_copy(update={"path": base, "device": args.device,
                                                    "image_size": max(64, side)})
            settings = TrainSettings(quantization=quantization, epochs=1, accumulate=1,
                                     rank=args.rank, alpha=2 * args.rank,
                                     heldout_fraction=1 / (args.steps + WARMUP + 1) * 1.5)
            out = work / f"adapter-{quantization}"
            card = train(TrainRequest(config.model_copy(update={"model": model}), out, data,
                                      settings, checkpoint_every=10_000, evaluate=False,
                                      allow_outside=True),
                         progress=sys.stderr)
            steps = [json.loads(line) for line in
                     (out / "training" / "loss.jsonl").read_text().splitlines()]
            times = [b["seconds"] - a["seconds"] for a, b in zip(steps, steps[1:])][WARMUP - 1:]
            tokens = statistics.median(s["target_tokens"] for s in steps)
            trained = card.training
            rows.append([quantization, len(times), f"{statistics.median(times):.3f}",
                         f"{max(times):.3f}", f"{tokens:.0f}", f"{trained['peak_memory_mb']:.0f}",
                         f"{trained['trainable_parameters'] / 1e6:.2f}", trained["device"]])
    print(machine_summary())
    print(f"base: {base.name}; LoRA rank {args.rank} on attention and MLP projections; one study "
          "(frontal + lateral) per step")
    print(table(["base weights", "steps timed", "s/step (median)", "s/step (max)",
                 "report tokens", "peak memory MB", "trainable M", "device"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
