"""Random checkpoints in the released LLaVA-3D-7B layout and the HF LLaVA layout, written from modules.

Used by the tests (tiny random checkpoints, sharded and unsharded), by ``adatoken-compile
make-tiny``, and by the training script of the bundled reference model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import processors

from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM)

from adatoken_compile.io import atomic_dir
from adatoken_compile.models.llava3d import BOX_PREFIX, PE_PREFIX, PROJ_PREFIX, PositionEmbedding3D, build_projector
from adatoken_compile.runtime.prompt import SYSTEM_PROMPT
from adatoken_compile.runtime.tokenizer import TextTokenizer, build_word_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

DEFAULT_TEXTS = [
    SYSTEM_PROMPT,
    "USER: ASSISTANT:",
    "what color is the ball? how many chairs are there? is there a table in the room? yes no",
    "which object is closest to the red box? red green blue yellow white purple orange box ball cylinder chair table",
    "0 1 2 3 4 5 6 7 8 9 the a an of in on is are what which where how many color shape left right",
]


def _contig(sd: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_safetensors(sd: dict[str, torch.Tensor], out_dir: str, shards: int = 1) -> None:
    """Single ``model.safetensors`` or ``shards`` files + ``model.safetensors.index.json``."""
    sd = _contig(sd)
    if shards <= 1:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def preprocessor_config(image_size: int, kind: str = "clip") -> dict:
    """A complete ``preprocessor_config.json``: CLIP's (short side to ``image_size``, centre crop) or
    SigLIP's (resize to ``image_size`` square, mean / std 0.5)."""
    if kind == "siglip":
        return {"image_processor_type": "SiglipImageProcessor", "size": {"height": image_size, "width": image_size},
                "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": image_size, "width": image_size},
            "size": {"shortest_edge": image_size}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}


def save_vision_tower(vision, out_dir: str, image_size: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    vision.config.save_pretrained(out_dir)
    save_safetensors(vision.state_dict(), out_dir)
    save_preprocessor(out_dir, image_size)


def save_preprocessor(out_dir: str, image_size: int) -> None:
    """The CLIP tower's preprocessor_config.json (crop size, CLIP mean / std)."""
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(image_size), f, indent=2)


def llava3d_config(decoder_config, mm_hidden: int, projector_type: str, tokenizer: TextTokenizer,
                   vision_subdir: str = "vision_tower", extra: dict | None = None) -> dict:
    """config.json of the released LLaVA-3D layout: the decoder's config plus the ``mm_*`` keys."""
    dcfg = decoder_config.to_dict()
    is_qwen = "qwen" in decoder_config.model_type
    cfg = {k: v for k, v in dcfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    cfg.update(
        {
            "model_type": "llava_qwen" if is_qwen else "llava_llama",
            "architectures": ["LlavaQwenForCausalLM" if is_qwen else "LlavaLlamaForCausalLM"],
            "mm_hidden_size": int(mm_hidden),
            "mm_vision_tower": vision_subdir,
            "mm_video_tower": "SpatialAwareModule",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_projector_type": projector_type,
            "mm_patch_merge_type": "flat",
            "num_frames": 20,
            "num_sample_tokens": 1152,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "tokenizer_model_max_length": int(dcfg.get("max_position_embeddings", 4096)),
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    )
    cfg.update(extra or {})
    return cfg


def save_llava3d(
    out_dir: str,
    decoder,
    vision,
    pe3d,
    projector,
    tokenizer: TextTokenizer,
    box_pe=None,
    shards: int = 1,
    vision_subdir: str = "vision_tower",
    extra: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Write a checkpoint directory in the released LLaVA-3D layout, atomically (an existing
    ``out_dir`` only when it is an earlier checkpoint this tool wrote and ``overwrite`` is given)."""
    with atomic_dir(out_dir, "checkpoint", overwrite=overwrite, marker=True) as tmp:
        cfg = llava3d_config(decoder.config, int(vision.config.hidden_size), "mlp2x_gelu" if len(projector) == 3 else "linear",
                             tokenizer, vision_subdir, extra)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, default=str)
        sd = dict(decoder.state_dict())
        if getattr(decoder.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        sd.update({PE_PREFIX + k: v for k, v in pe3d.state_dict().items()})
        sd.update({PROJ_PREFIX + k: v for k, v in projector.state_dict().items()})
        if box_pe is not None:
            sd.update({BOX_PREFIX + k: v for k, v in box_pe.state_dict().items()})
        save_safetensors(sd, tmp, shards=shards)
        tokenizer.save(tmp)
        save_vision_tower(vision, os.path.join(tmp, vision_subdir), int(vision.config.image_size))
    return out_dir


def random_llava3d(
    out_dir: str,
    *,
    decoder: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 56,
    patch_size: int = 14,
    shards: int = 1,
    with_boxes: bool = True,
    texts=None,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """A tiny random LLaVA-3D checkpoint in the released layout (tests, offline demos)."""
    torch.manual_seed(seed)
    tok = build_word_tokenizer(texts or DEFAULT_TEXTS, vocab_size=400)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate,
        vocab_size=tok.vocab_size,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        tie_word_embeddings=False,
    )
    if head_dim:
        common["head_dim"] = head_dim
    if decoder == "qwen2":
        lm = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        lm = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, **common))
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        )
    )
    pe = PositionEmbedding3D(3, vision_hidden)
    proj = build_projector("mlp2x_gelu", vision_hidden, hidden, "random")
    box = PositionEmbedding3D(3, hidden) if with_boxes else None
    return save_llava3d(out_dir, lm, vision, pe, proj, tok, box_pe=box, shards=shards, overwrite=overwrite)


# The chat template of llava-hf/llava-1.5-7b-hf (renders "USER: <image>\n{question} ASSISTANT:")
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A ChatML template as Qwen2 checkpoints ship (system turn, image part before the text)
CHATML_TEMPLATE = (
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def random_llava_hf(out_dir: str, *, decoder: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int | None = None, intermediate: int | None = None, vocab: int | None = None,
                    max_positions: int | None = None, image_size: int = 56, patch_size: int = 14, seed: int = 0,
                    image_processor: str = "clip", chat_template: str | None = None, overwrite: bool = False) -> str:
    """A tiny random HF LLaVA checkpoint (tests), with what ``LlavaProcessor.from_pretrained`` reads:
    a full image processor config (``clip`` or ``siglip``), ``processor_config.json`` and, when
    given, ``chat_template.jinja``. Llama-style checkpoints add BOS when tokenizing (as Llama
    tokenizers do); Qwen2-style ones have no BOS and ChatML's special tokens.

    ``intermediate`` (default ``2 * hidden``), ``vocab`` (default: the word tokenizer's size) and
    ``max_positions`` (default: the config class's) size a decoder like a real one for speed
    benchmarks; token ids past the tokenizer's words exist only as embedding rows."""
    torch.manual_seed(seed)
    tok = build_word_tokenizer(DEFAULT_TEXTS, vocab_size=400)
    if decoder == "qwen2":
        tok._tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        tok.bos_id = None
    else:
        tok._tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                special_tokens=[("<s>", tok.bos_id)])
    tc = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or hidden * 2,
              vocab_size=max(vocab or 0, tok.vocab_size), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
              pad_token_id=tok.pad_id)
    if max_positions:
        tc["max_position_embeddings"] = max_positions
    text = (Qwen2Config if decoder == "qwen2" else LlamaConfig)(**tc)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size)
    cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_id=tok.token_to_id("<image>"))
    m = LlavaForConditionalGeneration(cfg)
    with atomic_dir(out_dir, "checkpoint", overwrite=overwrite, marker=True) as tmp:
        m.save_pretrained(tmp, safe_serialization=True)
        tok.save(tmp)
        with open(os.path.join(tmp, "tokenizer_config.json")) as f:
            tcfg = json.load(f)
        tcfg.update({"bos_token": tok._tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None,
                     "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"})
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor_config(image_size, image_processor), f, indent=2)
        with open(os.path.join(tmp, "processor_config.json"), "w") as f:
            json.dump({"processor_class": "LlavaProcessor", "patch_size": patch_size, "image_token": "<image>",
                       "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
                       "num_additional_image_tokens": 1}, f, indent=2)
        if chat_template is not None:
            with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
                f.write(chat_template)
    return out_dir


# ----------------------------------------------------------------------------- full-size presets

# LLaVA-3D-7B as released: a Llama-2-7B decoder (vocab 32000), CLIP ViT-L/14 at 336 px, an
# mlp2x_gelu projector, 3D position embeddings for patches (vision width) and boxes (decoder width)
PRESETS = {
    "llava3d-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                       max_positions=4096, vision_hidden=1024, vision_layers=24, vision_heads=16,
                       vision_intermediate=4096, image_size=336, patch_size=14),
}
SHARD_BYTES = 2 * 1024**3


def preset_configs(spec: dict):
    """(LlamaConfig, CLIPVisionConfig) of a preset spec (``PRESETS`` entry, overrides applied)."""
    dec = LlamaConfig(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv_heads"], intermediate_size=spec["intermediate"],
                      vocab_size=spec["vocab"], max_position_embeddings=spec["max_positions"], rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vis = CLIPVisionConfig(hidden_size=spec["vision_hidden"], intermediate_size=spec["vision_intermediate"],
                           num_hidden_layers=spec["vision_layers"], num_attention_heads=spec["vision_heads"],
                           image_size=spec["image_size"], patch_size=spec["patch_size"], projection_dim=768)
    return dec, vis


def preset_plan(spec: dict) -> tuple[dict, dict]:
    """Tensor names and shapes of a preset checkpoint, without allocating a weight:
    ``({name: shape} of the LLaVA-3D weights, {name: shape} of the vision tower)``."""
    dec_cfg, vis_cfg = preset_configs(spec)
    with torch.device("meta"):
        parts = {
            "": LlamaForCausalLM(dec_cfg),
            PE_PREFIX: PositionEmbedding3D(3, spec["vision_hidden"]),
            PROJ_PREFIX: build_projector("mlp2x_gelu", spec["vision_hidden"], spec["hidden"], "preset"),
            BOX_PREFIX: PositionEmbedding3D(3, spec["hidden"]),
        }
        vision = CLIPVisionModel(vis_cfg)
    main = {prefix + k: tuple(v.shape) for prefix, m in parts.items() for k, v in m.state_dict().items()}
    return main, {k: tuple(v.shape) for k, v in vision.state_dict().items() if not k.endswith("position_ids")}


def _random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """float16 values a trained model's tensor of that kind could hold: norms 1, biases 0, weights N(0, 0.02)."""
    base = name.rsplit(".", 1)[-1]
    if base == "bias":
        return torch.zeros(shape, dtype=torch.float16)
    if base == "weight" and len(shape) == 1:  # RMSNorm / LayerNorm scales (linear and conv weights are 2-D+)
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)


def write_shards(plan: dict, out_dir: str, seed: int, max_bytes: int = SHARD_BYTES, log=None) -> None:
    """Random float16 tensors of ``plan`` ({name: shape}) as safetensors shards of at most
    ``max_bytes`` (``model-0000i-of-0000n.safetensors`` + index; one ``model.safetensors`` when
    it fits), generated and written one shard at a time."""
    shards, size = [[]], 0
    for name, shape in plan.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for fname, keys in zip(names, shards):
        part = {k: _random_tensor(k, plan[k], gen) for k in keys}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        del part
        if log is not None:
            log(f"wrote {fname} ({len(keys)} tensors)")
    if n > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def random_llava3d_preset(out_dir: str, preset: str = "llava3d-7b", *, seed: int = 0, overwrite: bool = False,
                          max_shard_bytes: int = SHARD_BYTES, log=None, **overrides) -> str:
    """A RANDOM checkpoint of a full-size preset (``PRESETS``) in the released LLaVA-3D layout,
    float16, sharded, written shard by shard (a 7B checkpoint never sits in memory). ``overrides``
    replace preset fields (e.g. ``layers=2`` for a shallow one of the same width)."""
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"random_llava3d_preset: unknown fields {sorted(unknown)}")
    spec = {**PRESETS[preset], **overrides}
    dec_cfg, vis_cfg = preset_configs(spec)
    main, vision = preset_plan(spec)
    tok = build_word_tokenizer(DEFAULT_TEXTS, vocab_size=400)
    with atomic_dir(out_dir, "checkpoint", overwrite=overwrite, marker=True) as tmp:
        cfg = llava3d_config(dec_cfg, spec["vision_hidden"], "mlp2x_gelu", tok,
                             extra={"torch_dtype": "float16", "preset": preset, "random_weights": True})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, default=str)
        tok.save(tmp)
        write_shards(main, tmp, seed, max_shard_bytes, log)
        vdir = os.path.join(tmp, "vision_tower")
        os.makedirs(vdir)
        vis_cfg.save_pretrained(vdir)
        write_shards(vision, vdir, seed + 1, max_shard_bytes, log)
        save_preprocessor(vdir, spec["image_size"])
    return out_dir


# ----------------------------------------------------------------------------- tiny Qwen2.5-VL

# The chat template Qwen2.5-VL checkpoints ship (images and text; videos as <|video_pad|>)
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN25VL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                     "<|video_pad|>"]


def qwen25vl_tokenizer(texts=None) -> TextTokenizer:
    """A word-level tokenizer trained on ``texts`` (default ``DEFAULT_TEXTS``) with Qwen2.5-VL's
    ChatML and vision special tokens; EOS is ``<|im_end|>``, no BOS."""
    tok = build_word_tokenizer(texts or DEFAULT_TEXTS, vocab_size=400)
    tok._tok.add_special_tokens(QWEN25VL_SPECIALS)
    # ChatML ends every prompt with a newline: a token of its own (not <unk>, whose embedding is the
    # zero padding row), as in Qwen's vocabulary
    tok._tok.add_tokens(["\n"])
    tok.bos_id = None
    tok.eos_id = tok.token_to_id("<|im_end|>")
    return tok


def qwen25vl_token_ids(tok) -> dict:
    """The ``Qwen2_5_VLConfig`` keyword arguments that name ``tok``'s special tokens."""
    return dict(image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
                vision_start_token_id=tok.token_to_id("<|vision_start|>"),
                vision_end_token_id=tok.token_to_id("<|vision_end|>"), eos_token_id=tok.eos_id)


def save_qwen25vl(model, tok, out_dir: str, *, min_pixels: int, max_pixels: int, overwrite: bool = False,
                  extra: dict | None = None) -> str:
    """``model`` (a ``Qwen2_5_VLForConditionalGeneration``) with the files a released checkpoint
    ships: config, safetensors, tokenizer, ``chat_template.jinja`` and ``preprocessor_config.json``
    (``Qwen2VLImageProcessor`` with ``min_pixels`` / ``max_pixels``), written atomically; ``extra``:
    more JSON files, name -> content."""
    patch_size = int(model.config.vision_config.patch_size)
    with atomic_dir(out_dir, "checkpoint", overwrite=overwrite, marker=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save(tmp)
        with open(os.path.join(tmp, "tokenizer_config.json")) as f:
            tcfg = json.load(f)
        tcfg.update({"bos_token": None, "eos_token": "<|im_end|>", "unk_token": "<unk>",
                     "tokenizer_class": "PreTrainedTokenizerFast"})
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": min_pixels,
                       "max_pixels": max_pixels, "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2,
                       "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_rescale": True, "rescale_factor": 1 / 255,
                       "do_normalize": True, "do_resize": True, "resample": 3}, f, indent=2)
        with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
            f.write(QWEN25VL_CHAT_TEMPLATE)
        for name, content in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
    return out_dir


def random_qwen25vl(out_dir: str, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    vision_depth: int = 4, vision_hidden: int = 32, fullatt_blocks=(1, 3), patch_size: int = 14,
                    window_size: int = 112, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64,
                    seed: int = 0, overwrite: bool = False) -> str:
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` checkpoint (GQA decoder, windowed and
    full-attention vision blocks, 2x2 merger) with the files a released one ships (:func:`save_qwen25vl`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = qwen25vl_tokenizer()
    head_dim = hidden // heads
    third = head_dim // 2 // 3
    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=hidden * 2, vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head_dim // 2 - 2 * third, third, third]})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                  patch_size=patch_size, window_size=window_size, out_hidden_size=hidden,
                  fullatt_block_indexes=list(fullatt_blocks), spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen25vl_token_ids(tok))
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return save_qwen25vl(m, tok, out_dir, min_pixels=min_pixels, max_pixels=max_pixels, overwrite=overwrite)
