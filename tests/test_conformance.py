"""Every supported architecture x quantization x adapter through the worker's real code path.

Tiny random models (tests/modelzoo.py) of the real transformers classes, loaded by `load_model`
and drafting with `draft` on a real chest X-ray, on CPU with bitsandbytes. Random weights write
junk, so a draft may be ok or a degenerate-output failure; either way the result must be whole,
the quantization must really be in the weights, and the adapter must really change the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from modelzoo import ARCHITECTURES, build_adapter, build_model, xray_image
from peft import PeftModel

from cxr_node.config import ModelConfig
from cxr_node.identity import fingerprint
from workers.model import ARCHITECTURES as SUPPORTED
from workers.model import ReportModel, load_model
from workers.payload import DraftResult

GENERATION = {"max_new_tokens": 12}  # greedy (the default): the same draft every run
QUANTIZED = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
LANGUAGE_MODEL = ("model.language_model.", "model.text_model.")

RESULT_KEYS = set(DraftResult.model_fields)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    model_dir = build_model(request.param, root / "model")
    return request.param, model_dir, build_adapter(model_dir, root / "adapter")


@pytest.fixture(scope="module")
def study(nih_images: Path) -> dict[str, Any]:
    """A two-image request (frontal first) from real NIH ChestX-ray14 images, with an indication."""
    return {
        "request_id": "j7-r1",
        "images": [
            xray_image(nih_images, "00000129_000.png", "PA"),
            xray_image(nih_images, "00000284_000.png", "LATERAL"),
        ],
        "indication": "Fever and productive cough.",
    }


def test_the_zoo_covers_every_supported_architecture() -> None:
    assert set(ARCHITECTURES) == set(SUPPORTED)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _check_quantization(rm: ReportModel, quantization: str) -> None:
    """Language-model linears are bitsandbytes layers; vision tower, projector and lm_head are not."""
    modules = dict(_base(rm.model).named_modules())
    bnb_layers = {n for n, m in modules.items() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    vision = []
    for prefix in rm.arch.vision_modules:
        inside = [n for n in modules if n == prefix or n.startswith(prefix + ".")]
        assert inside, f"{prefix} is not a module of {rm.arch.model_type}"
        vision += inside
    assert any(type(modules[n]) is torch.nn.Linear for n in vision)  # full-precision linears
    assert not bnb_layers & set(vision)
    assert type(modules["lm_head"]) is torch.nn.Linear
    if quantization == "none":
        assert not bnb_layers
        return
    language = [
        n for n, m in modules.items()
        if n.startswith(LANGUAGE_MODEL) and isinstance(m, torch.nn.Linear) and "lora_" not in n
    ]
    assert language
    assert all(isinstance(modules[n], QUANTIZED[quantization]) for n in language), [
        (n, type(modules[n]).__name__) for n in language if not isinstance(modules[n], QUANTIZED[quantization])
    ]


def _check_adapter(rm: ReportModel, study: dict[str, Any]) -> None:
    """LoRA layers sit on the language model's attention, and they change the logits."""
    assert isinstance(rm.model, PeftModel)
    lora = [n for n, _ in rm.model.named_modules() if n.endswith(".lora_A")]
    assert lora and all(any(p in n for p in LANGUAGE_MODEL) for n in lora)
    inputs = rm.model_inputs([study])
    with torch.inference_mode():
        with_adapter = rm.model(**inputs).logits[:, -1].float()
        with rm.model.disable_adapter():
            without = rm.model(**inputs).logits[:, -1].float()
    assert not torch.allclose(with_adapter, without, atol=1e-3)


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_draft_conforms(
    zoo: tuple[str, Path, Path], quantization: str, adapter: bool, study: dict[str, Any]
) -> None:
    architecture, model_dir, adapter_dir = zoo
    config = ModelConfig(
        device="cpu",
        quantization=quantization,
        adapter=adapter_dir if adapter else None,
        send_indication=True,
        generation=GENERATION,
    )
    rm = load_model(config, model_dir)
    [result] = rm.draft([study])

    assert set(result) == RESULT_KEYS
    assert DraftResult.model_validate(result)  # the contract the node reads
    assert result["request_id"] == "j7-r1"
    assert isinstance(result["text"], str) and isinstance(result["notes"], list)
    if result["ok"]:
        assert result["reason"] is None and result["findings"].strip()
    else:  # random weights may write nothing or one word over and over; that is the only excuse
        assert result["reason"].startswith(("degenerate output", "the model wrote")), result["reason"]
    if architecture == "paligemma":
        assert "lateral image dropped: paligemma takes one image" in result["notes"]

    identity = result["model"]
    assert identity["architecture"] == architecture
    assert identity["quantization"] == quantization
    assert identity["name"] and identity["version"] and len(identity["fingerprint"]) == 64
    assert identity["demo"] is (architecture == "gemma3")  # the zoo's Gemma3 is the demo model
    timings = result["timings"]
    assert timings["batch_size"] == 1 and timings["device"] == "cpu"
    assert 0 <= timings["new_tokens"] <= GENERATION["max_new_tokens"] and timings["generate_seconds"] > 0

    _check_quantization(rm, quantization)
    if adapter:
        assert identity["adapter"].startswith("adapter@")
        assert identity["fingerprint"] != fingerprint(config.model_copy(update={"adapter": None}), model_dir)
        _check_adapter(rm, study)
    else:
        assert identity["adapter"] is None and not isinstance(rm.model, PeftModel)


def test_batch_of_three_equals_three_drafts_alone(zoo: tuple[str, Path, Path], nih_images: Path) -> None:
    """Left padding and per-request image lists are right for each processor."""
    _, model_dir, _ = zoo
    rm = load_model(ModelConfig(device="cpu", quantization="none", generation=GENERATION), model_dir)
    requests = [
        {"request_id": f"r{i}", "images": [xray_image(nih_images, name, "PA")], "indication": None}
        for i, name in enumerate(["00000129_000.png", "00000284_000.png", "00000353_000.png"])
    ]
    requests[1]["images"].append(xray_image(nih_images, "00000427_000.png", "LATERAL", image_size=512))
    batched = rm.draft(requests)
    assert [r["request_id"] for r in batched] == ["r0", "r1", "r2"]
    assert [r["text"] for r in batched] == [rm.draft([r])[0]["text"] for r in requests]
