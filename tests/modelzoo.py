"""Tiny random models of every architecture the worker supports, and real inputs for them, for tests.

Each one is the real transformers class with a real processor (PIL image backend) and a tokenizer
trained here, saved with save_pretrained exactly as a downloaded checkpoint is laid out, so the
worker's loading, prompting, batching, quantization and adapter code runs unchanged. Weights are
random (seeded), so text is random words; only the shapes of things are meaningful.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from workers.demo import build_demo_model, train_word_tokenizer
from workers.model import image_only_processor_class
from workers.payload import encode_image

# One small language model shape for all: 2 layers, width 64, grouped-query attention.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str], **named: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=train_word_tokenizer(specials),
        unk_token="<unk>",
        padding_side="left",
        **named,
    )


def _save(model: PreTrainedModel, processor: ProcessorMixin, target: Path) -> Path:
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def _text_ids(tok: PreTrainedTokenizerFast, eos: list[str]) -> dict[str, object]:
    return dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(t) for t in eos],
    )


def build_llava(target: Path) -> Path:
    tok = _tokenizer(
        ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    # CLIP resizes the short side and centre-crops: the square 32 px crop is the model's view.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=64),
        text_config=LlamaConfig(**TEXT, **_text_ids(tok, ["</s>"])),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    return _save(LlavaForConditionalGeneration(config), processor, target)


def build_paligemma(target: Path) -> Path:
    tok = _tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # no chat template
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=64),
        text_config=GemmaConfig(**TEXT, head_dim=16, **_text_ids(tok, ["<eos>"])),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
    )
    return _save(PaliGemmaForConditionalGeneration(config), processor, target)


def build_idefics3(target: Path) -> Path:
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = _tokenizer(
        [
            "<|end_of_text|>",
            "<|begin_of_text|>",
            "<unk>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            *tiles,
        ],
        pad_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
    )
    # Images are cut into 32 px tiles plus one 32 px global view (2 x 2 tiles at most here).
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**VISION, image_size=32, patch_size=8),
        text_config=LlamaConfig(**TEXT, **_text_ids(tok, ["<end_of_utterance>", "<|end_of_text|>"])),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return _save(Idefics3ForConditionalGeneration(config), processor, target)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<unk>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_image_processor() -> Qwen2VLImageProcessorPil:
    # Dynamic resolution: 14 px patches merged 2 x 2, at most 112 x 112 px (16 image tokens).
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2
    )


QWEN_ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def build_qwen2_vl(target: Path) -> Path:
    tok = _qwen_tokenizer()
    processor = image_only_processor_class(Qwen2VLProcessor)(
        image_processor=_qwen_image_processor(), tokenizer=tok, chat_template=QWEN_TEMPLATE
    )
    config = Qwen2VLConfig(
        text_config=dict(**TEXT, **_text_ids(tok, ["<|im_end|>"]), rope_parameters=QWEN_ROPE),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14
        ),
        **_qwen_ids(tok),
    )
    return _save(Qwen2VLForConditionalGeneration(config), processor, target)


def build_qwen2_5_vl(target: Path) -> Path:
    tok = _qwen_tokenizer()
    processor = image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=_qwen_image_processor(), tokenizer=tok, chat_template=QWEN_TEMPLATE
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(**TEXT, **_text_ids(tok, ["<|im_end|>"]), rope_parameters=QWEN_ROPE),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
            patch_size=14,
        ),
        **_qwen_ids(tok),
    )
    return _save(Qwen2_5_VLForConditionalGeneration(config), processor, target)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "gemma3": build_demo_model,  # the demo model is the tiny Gemma3
    "llava": build_llava,
    "paligemma": build_paligemma,
    "idefics3": build_idefics3,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}
ARCHITECTURES = tuple(BUILDERS)


def build_model(architecture: str, target: Path, seed: int = 0) -> Path:
    """Save a tiny random `architecture` model (a config.model_type) with its processor to `target`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[architecture](Path(target))


def build_adapter(model_dir: Path, target: Path, seed: int = 1) -> Path:
    """A LoRA adapter on the language model's attention projections, with non-zero B so it shows.

    peft initialises B to zero (the adapter starts as a no-op); random B makes the adapter change
    the output, which is what a test of "the adapter was applied" needs.
    """
    base = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    model.save_pretrained(target)
    return Path(target)


def xray_image(images: Path, name: str, view: str, image_size: int = 896) -> dict[str, object]:
    """A real NIH ChestX-ray14 image as the node sends it: 8-bit grayscale PNG, longest side capped."""
    with Image.open(images / name) as image:
        pixels = np.asarray(image.convert("L"))
    return encode_image(pixels, view, image_size).to_dict()
