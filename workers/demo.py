"""The demo model: a tiny Gemma3 with random weights, built in code so a fresh install drafts end to end.

Nothing is downloaded. The tokenizer is trained here on a short built-in word list, so the demo writes
random radiology words: it proves the plumbing (queue, worker, SR, PACS) and never pretends to read an
image. Its manifest says DEMO, and the node marks every draft it writes as such.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from workers.model import MANIFEST_NAME  # first: it puts the Hugging Face libraries offline

import torch  # noqa: E402, I001
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

DEMO_MANIFEST = {"name": "cxr-node DEMO (random weights)", "version": "demo-1", "demo": True}
DEMO_SEED = 20240601

# Words of chest X-ray reports and of the default prompt; the demo can only ever emit these.
DEMO_WORDS: tuple[str, ...] = tuple(
    """
    findings impression : . , ; - ( ) the a an and or of with without in on at to is are was no not
    there seen normal abnormal stable unchanged new mild moderate severe small large left right
    bilateral upper middle lower lobe lobes lung lungs pleural effusion effusions pneumothorax
    consolidation opacity opacities atelectasis edema pulmonary vascular congestion heart size
    cardiac silhouette cardiomegaly mediastinum mediastinal hilar contours trachea midline
    costophrenic angle angles sharp blunted diaphragm hemidiaphragm elevated osseous structures
    intact fracture fractures rib ribs spine degenerative changes soft tissues nodule nodules
    mass granuloma calcified interstitial markings prominent clear well expanded inflated
    hyperinflated emphysema scarring fibrosis infiltrate pneumonia infection aspiration
    support devices tube line catheter tip projects over svc endotracheal nasogastric pacemaker
    sternotomy wires clips surgical acute cardiopulmonary process disease evidence of
    suggestive likely possible cannot excluded compared prior study frontal lateral view views
    pa ap portable upright supine radiograph chest x-ray you radiologist write report this
    study answer two sections indication user model
    """.split()
)

GEMMA3_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Gemma 3's conversation format, shortened to what a one-turn request uses.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def train_word_tokenizer(special_tokens: Sequence[str], words: Iterable[str] = DEMO_WORDS) -> Tokenizer:
    """A word-level tokenizer over `words` (lower-cased; anything else is <unk>), specials first.

    Whole words keep random output readable as words. Special tokens get ids 0..n-1 in the given
    order, so a model's special ids do not depend on the word list.
    """
    if "<unk>" not in special_tokens:
        raise ValueError("special_tokens must include '<unk>'")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(special_tokens), show_progress=False)
    tokenizer.train_from_iterator([" ".join(sorted(set(words)))], trainer=trainer)
    return tokenizer


def demo_processor() -> Gemma3Processor:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_word_tokenizer(GEMMA3_SPECIAL_TOKENS),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # A fixed square input like MedGemma's 896 x 896, at a size a CPU draws in milliseconds.
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=16,
    )


def _demo_model(processor: Gemma3Processor) -> Gemma3ForConditionalGeneration:
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, ids("<end_of_turn>")],
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = Gemma3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    return model.eval()


def build_demo_model(target: Path) -> Path:
    """Write the demo model to `target` (which must not exist) atomically; returns `target`.

    Built in a private temporary folder beside `target` and renamed into place, so a worker never
    loads half a model and two workers racing to build it leave one whole copy (the loser gets
    FileExistsError).
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; the demo model is only written to a new folder")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # created 0700
    try:
        processor = demo_processor()
        _demo_model(processor).save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(DEMO_MANIFEST, indent=2) + "\n")
        for path in staging.rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
        try:
            os.rename(staging, target)
        except OSError as exc:
            if target.exists():
                raise FileExistsError(f"{target} was created by another process meanwhile") from exc
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
