"""Loading a vision-language model from a local folder, and drafting reports with it in batches.

The model is read from disk only: a worker never downloads anything, and a folder that is missing
or half-copied stops it with a message naming the folder and the missing part. Weights and
adapters are read from safetensors only: a pickle (``pytorch_model.bin``, ``*.pt``) runs code when
loaded, so a folder that has only pickles is refused. One `draft` call is one batched `generate`:
a batch costs about the time of its longest report, not the sum. Each result is a DraftResult
(workers/payload.py) carrying the model's identity (cxr_node/identity.py, computed the way the
node computes it).
"""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import functools  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import structlog  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    BitsAndBytesConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from cxr_node.config import ModelConfig  # noqa: E402
from cxr_node.identity import (  # noqa: E402
    MANIFEST_NAME,
    IdentityError,
    ModelIdentity,
    architecture_of,
    model_identity,
)
from workers.payload import (  # noqa: E402
    MAX_INDICATION_CHARS,
    MAX_NOTES,
    MAX_REASON,
    MAX_RESULT_TEXT,
    DraftRequest,
    DraftResult,
    ParsedReport,
    PayloadError,
    Timings,
    TransientDraftError,
    parse_report,
    request_id_of,
)

__all__ = ["MANIFEST_NAME", "LoadedBase", "ModelLoadError", "ReportModel", "load_base", "load_model"]  # MANIFEST_NAME: re-exported

log = structlog.get_logger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# bitsandbytes 8-bit matmul on CPU casts fp32 to fp16 and says so on every call.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


class ModelLoadError(Exception):
    """The model folder, adapter or settings cannot give a working model; retrying will not help."""


@dataclass(frozen=True)
class Architecture:
    """What differs between model families, keyed by config.json's model_type."""

    model_type: str
    vision_modules: tuple[str, ...]  # vision encoder + projector, kept unquantized with lm_head
    letterbox: bool  # the processor squashes or crops to a fixed square
    projector: str  # maps image features to the language model: an adapter's optional first stage
    max_images: int | None = None


_SIGLIP_STYLE = ("model.vision_tower", "model.multi_modal_projector")
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("gemma3", _SIGLIP_STYLE, True, _SIGLIP_STYLE[1]),  # MedGemma
        Architecture("llava", _SIGLIP_STYLE, True, _SIGLIP_STYLE[1]),  # CLIP centre-crops
        Architecture("paligemma", _SIGLIP_STYLE, True, _SIGLIP_STYLE[1], max_images=1),
        Architecture("idefics3", ("model.vision_model", "model.connector"), True, "model.connector"),
        # Qwen2-VL keeps the image's aspect ratio; its merger is the projector
        Architecture("qwen2_vl", ("model.visual",), False, "model.visual.merger"),
        Architecture("qwen2_5_vl", ("model.visual",), False, "model.visual.merger"),
    )
}

VIEW_WORDS = {"PA": "PA", "AP": "AP", "LATERAL": "lateral", "UNKNOWN": "unspecified"}


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelLoadError naming everything a loadable model folder lacks."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist or is not a folder")
    names = {p.name for p in model_dir.iterdir() if p.is_file()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(WEIGHTS_SUFFIX) for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelLoadError(
                f"model folder {model_dir} has weights only as pickles ({', '.join(pickles)}): "
                "loading a pickle runs code, so only safetensors are loaded; convert them "
                "(transformers: save_pretrained(..., safe_serialization=True)) or use the "
                "model's safetensors release"
            )
        missing.append("weights (*.safetensors)")
    for index in (n for n in names if n.endswith(".index.json")):
        try:
            shards = set(json.loads((model_dir / index).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            raise ModelLoadError(f"model folder {model_dir}: {index} is not a readable weight index") from None
        missing += [f"{shard} (listed in {index})" for shard in sorted(shards - names)]
    if not names & {"processor_config.json", "preprocessor_config.json"}:
        missing.append("processor_config.json or preprocessor_config.json")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise ModelLoadError(f"model folder {model_dir} is incomplete: missing {', '.join(missing)}")


def check_adapter_dir(adapter_dir: Path) -> None:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter folder {adapter_dir} does not exist or is not a folder")
    missing = []
    if not (adapter_dir / "adapter_config.json").is_file():
        missing.append("adapter_config.json")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise ModelLoadError(
                f"adapter folder {adapter_dir} has adapter_model.bin, a pickle: loading it runs "
                "code, so only adapter_model.safetensors is loaded; save the adapter with "
                "safe_serialization=True"
            )
        missing.append("adapter_model.safetensors")
    if missing:
        raise ModelLoadError(f"adapter folder {adapter_dir} is incomplete: missing {', '.join(missing)}")


def resolve_device(config: ModelConfig) -> str:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ModelLoadError(f"model.device is cuda but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={visible})")
    return "cuda:0"  # CUDA_VISIBLE_DEVICES picks the GPU: one worker per GPU


def resolve_dtype(config: ModelConfig, device: str) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[config.dtype]


def quantization_config(config: ModelConfig, arch: Architecture, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings; the vision encoder, projector and lm_head stay in `dtype`.

    They are a small share of the weights and the most sensitive to rounding: what the model
    sees of the image should not be blurred to save a few hundred MB.
    """
    skip = [*arch.vision_modules, "lm_head"]
    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


@functools.cache
def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor, under the same name (so it saves the same).

    transformers 5 builds every sub-processor a VL processor declares, and video processors need
    torchvision, which this product cannot install next to the CPU torch wheel (Qwen2-VL,
    Qwen2.5-VL; transformers issue #48558). Reports only need images.
    """

    class ImageOnly(processor_class):  # type: ignore[valid-type, misc]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def _declared_processor_class(model_dir: Path) -> type[ProcessorMixin] | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            declared = json.loads(path.read_text()).get("processor_class")
            found = getattr(transformers, declared, None) if isinstance(declared, str) else None
            if isinstance(found, type) and issubclass(found, ProcessorMixin):
                return found
    return None


def load_processor(model_dir: Path) -> ProcessorMixin:
    """AutoProcessor, or the declared processor without video support when that cannot be built."""
    try:
        return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ImportError, ValueError, AttributeError) as exc:
        declared = _declared_processor_class(model_dir)
        if declared is None or "video_processor" not in declared.get_attributes():
            raise
        log.info("loading the processor without video support", processor=declared.__name__, cause=str(exc)[:200])
        return image_only_processor_class(declared).from_pretrained(model_dir, local_files_only=True)


@dataclass
class LoadedBase:
    """A base model as loaded for drafting or for training an adapter on it."""

    model: PreTrainedModel
    processor: ProcessorMixin
    arch: Architecture
    identity: ModelIdentity
    device: str
    dtype: torch.dtype


def load_base(config: ModelConfig, model_dir: Path) -> LoadedBase:
    """Processor and weights (quantized as configured), without the adapter; `identity` is the
    identity of the model with `config`'s settings, adapter included."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if config.adapter is not None:
        check_adapter_dir(config.adapter)
    try:
        model_type = architecture_of(model_dir)
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise ModelLoadError(
                f"{model_dir}: architecture {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        identity = model_identity(config, model_dir)
    except IdentityError as exc:
        raise ModelLoadError(str(exc)) from None
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave half the cores to the node (receivers, SQLite); on a busy 2-core machine two
        # threads made a small model's generate 5-10x slower than one.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        processor = load_processor(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir,
            local_files_only=True,
            dtype=dtype,
            quantization_config=quantization_config(config, arch, dtype),
            device_map={"": device},
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the model in {model_dir}: {exc}") from exc
    if processor.chat_template is None and getattr(processor, "image_token", None) is None:
        raise ModelLoadError(f"{model_dir}: the processor has neither a chat template nor an image token")
    return LoadedBase(model, processor, arch, identity, device, dtype)


def load_model(config: ModelConfig, model_dir: Path) -> ReportModel:
    """Load processor, weights (quantized as configured) and the optional LoRA adapter."""
    started = time.perf_counter()
    base = load_base(config, model_dir)
    model = base.model
    if config.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(config.adapter), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load the adapter in {config.adapter}: {exc}") from exc
    base.processor.tokenizer.padding_side = "left"  # decoder-only batching: prompts end where text starts
    identity = base.identity
    log.info(
        "model loaded",
        model=identity.name,
        version=identity.version,
        architecture=base.arch.model_type,
        quantization=config.quantization,
        adapter=identity.adapter,
        device=base.device,
        dtype=str(base.dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 2),
    )
    return ReportModel(model.eval(), base.processor, base.arch, identity, config, base.device)


def letterbox(image: Image.Image) -> Image.Image:
    """Centre a grayscale image on a black square, so a square-input processor keeps its shape."""
    if image.width == image.height:
        return image
    side = max(image.size)
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def views_phrase(views: Sequence[str]) -> str:
    words = [VIEW_WORDS[v] for v in views]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass
class _Prepared:
    request_id: str
    prompt: str  # the instruction, before the model's conversation format
    text: str  # the prompt as the model reads it
    images: list[Image.Image]
    notes: list[str]


class ReportModel:
    """A loaded model with its processor; `draft` turns DraftRequest dicts into DraftResult dicts."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        arch: Architecture,
        identity: ModelIdentity,
        config: ModelConfig,
        device: str,
    ):
        self.model = model
        self.processor = processor
        self.arch = arch
        self.identity = identity
        self.config = config
        self.device = device
        self.hostname = socket.gethostname()
        self.max_images = min(config.max_images, arch.max_images or config.max_images)
        self._eos_ids = self._end_token_ids()

    def _end_token_ids(self) -> list[int]:
        """Every id that ends a turn: the generation config's, the tokenizer's EOS."""
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        eos = self.processor.tokenizer.eos_token_id
        ids = sorted({*ids, *([eos] if eos is not None else [])})
        if not ids:
            raise ModelLoadError(f"{self.identity.name}: neither the generation config nor the tokenizer names an end token")
        return ids

    def draft(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One result per request, in order; one batched generate for all requests that can run.

        A bad request fails alone (ok=false with a reason). GPU out of memory raises
        TransientDraftError for the whole batch: the task fails, and the node decides on a retry.
        """
        prepared: list[_Prepared | dict[str, Any]] = []
        for raw in requests:
            try:
                prepared.append(self._prepare(raw))
            except PayloadError as exc:
                prepared.append({"request_id": request_id_of(raw), "reason": str(exc)})
        runnable = [p for p in prepared if isinstance(p, _Prepared)]
        texts: list[str] = []
        counts: list[int] = []
        seconds = 0.0
        if runnable:
            texts, counts, seconds = self._generate(runnable)
        def timings(new_tokens: int) -> Timings:
            return Timings(generate_seconds=round(seconds, 4), batch_size=len(runnable),
                           new_tokens=new_tokens, worker=self.hostname[:255], device=self.device)

        generated = iter(zip(texts, counts, strict=True))
        results = []
        for item in prepared:
            if isinstance(item, _Prepared):
                text, count = next(generated)
                answer = self._answer(item.request_id, parse_report(text), text, item.notes, timings(count))
            else:
                answer = self._answer(item["request_id"], ParsedReport(reason=item["reason"]), "", [], timings(0))
            results.append(answer.model_dump(mode="json"))
        log.info(
            "draft batch",
            requests=len(requests),
            generated=len(runnable),
            failed=sum(not r["ok"] for r in results),
            seconds=round(seconds, 4),
            new_tokens=sum(counts),
        )
        return results

    def _prepare(self, raw: Any) -> _Prepared:
        request = DraftRequest.from_dict(raw)
        notes: list[str] = []
        images = list(request.images)
        for dropped in images[self.max_images :]:
            notes.append(
                f"{VIEW_WORDS[dropped.view]} image dropped: {self.arch.model_type} takes "
                f"{'one image' if self.max_images == 1 else f'{self.max_images} images'}"
            )
        images = images[: self.max_images]
        pixels = []
        for image in images:
            decoded = image.decode()
            if max(decoded.size) > self.config.image_size:
                decoded.thumbnail((self.config.image_size, self.config.image_size), Image.Resampling.LANCZOS)
                notes.append(f"{VIEW_WORDS[image.view]} image scaled down to {self.config.image_size} px")
            pixels.append((letterbox(decoded) if self.arch.letterbox else decoded).convert("RGB"))
        indication = ""
        if request.indication and request.indication.strip():
            if self.config.send_indication:
                clean = " ".join(request.indication.split())[:MAX_INDICATION_CHARS]
                indication = f"Indication: {clean}\n "
            else:  # this worker is set not to read free text (it may hold PHI)
                notes.append("indication ignored: model.send_indication is off on the worker")
        prompt = self.config.prompt.format(views=views_phrase([i.view for i in images]), indication=indication)
        return _Prepared(request.request_id, prompt, self._render(prompt, len(pixels)), pixels, notes)

    def _render(self, prompt: str, n_images: int, answer: str | None = None) -> str:
        """The prompt in the model's own conversation format, with one image slot per image;
        with `answer`, the conversation that goes on with it as the model's turn (training)."""
        if self.processor.chat_template is not None:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=answer is None, tokenize=False)
        # PaliGemma style: image tokens first; the processor adds BOS after them.
        text = self.processor.image_token * n_images + prompt
        return text if answer is None else f"{text}\n{answer}{self.processor.tokenizer.eos_token}"

    def conversation(self, raw: Mapping[str, Any], answer: str) -> tuple[str, str, list[Image.Image]]:
        """For training: the prompt exactly as drafting renders it for the request `raw`, the
        same conversation with `answer` as the model's turn, and the images it sees."""
        prepared = self._prepare(raw)
        return prepared.text, self._render(prepared.prompt, len(prepared.images), answer), prepared.images

    def model_inputs(self, requests: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """The tensors the model sees for valid `requests` (raises PayloadError for a bad one)."""
        return self._encode([self._prepare(r) for r in requests])

    def _encode(self, batch: list[_Prepared]) -> BatchFeature:
        inputs = self.processor(
            text=[p.text for p in batch],
            images=[p.images for p in batch],
            padding=True,
            return_tensors="pt",
        )
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate(self, batch: list[_Prepared]) -> tuple[list[str], list[int], float]:
        g = self.config.generation
        tokenizer = self.processor.tokenizer
        inputs = self._encode(batch)
        sampling = {"temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {
            "temperature": None, "top_p": None, "top_k": None
        }
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos_ids[0]
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=g.max_new_tokens,
                    min_new_tokens=g.min_new_tokens,
                    num_beams=g.num_beams,
                    do_sample=g.do_sample,
                    repetition_penalty=g.repetition_penalty,
                    no_repeat_ngram_size=g.no_repeat_ngram_size,
                    pad_token_id=pad,
                    eos_token_id=self._eos_ids,
                    **sampling,
                )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise TransientDraftError(f"GPU out of memory drafting a batch of {len(batch)}") from exc
        seconds = time.perf_counter() - started
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        texts, counts = [], []
        stop = {*self._eos_ids, pad}
        for row in new:
            end = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
            counts.append(end)
        return texts, counts, seconds

    def _answer(
        self, request_id: str, parsed: ParsedReport, text: str, notes: list[str], timings: Timings
    ) -> DraftResult:
        """The result for one request, within the contract's bounds (the node checks them too)."""
        if parsed.ok and len(parsed.findings) + len(parsed.impression) > MAX_RESULT_TEXT:
            parsed = ParsedReport(reason=f"the model wrote more than {MAX_RESULT_TEXT} characters")
        return DraftResult(
            request_id=request_id,
            ok=parsed.ok,
            findings=parsed.findings,
            impression=parsed.impression,
            reason=None if parsed.ok else (parsed.reason or "no reason given")[:MAX_REASON],
            text=text[:MAX_RESULT_TEXT],
            notes=[note[:MAX_REASON] for note in [*notes, *parsed.notes]][:MAX_NOTES],
            model=self.identity,
            timings=timings,
        )
