"""Qwen2.5-VL adapter: ``Qwen2_5_VLForConditionalGeneration`` checkpoints, transformers' own code.

The image and video tokens (after the tower's 2x2 patch merger) are the spatial tokens; one prompt
may hold several images and videos (:class:`~adatoken_compile.runtime.sample.Video`: frames, with a
t axis that steps by ``tokens_per_second * second_per_grid_ts``). What differs from the LLaVA
families is declared here and nowhere else:

* **positions** -- M-RoPE: ``position_ids (3, B, L)``, each image token at its image's start
  position plus its (t, h, w) on the merged grid (:func:`adatoken_compile.runtime.qwen_vision.token_coordinates`,
  carried as the tokens' ``spatial_xyz``), built by the runtime's ``mrope`` layout. The text
  model's rotary embedding mixes the three axes by ``mrope_section`` into ordinary (B, L, head_dim)
  cos / sin tables, so cuts gather them with the hidden states like any other family's and every
  kept token keeps its original (t, h, w) rotation; decoding continues from the unpruned prompt's
  largest position + 1 (transformers' ``rope_deltas``), whatever the cuts dropped.
* **the vision tower** -- exported per image as :class:`VisionTower` (a video runs it once per
  temporal patch): the tower's own modules (patch embedding, rotary, windowed and full-attention
  blocks, merger) with the window and image segments given as ids the runtime computes in numpy
  (transformers splits the sequence by Python lists there, which no graph can hold).
* **the decoder** -- :class:`TextCausalLM`: the checkpoint's ``Qwen2_5_VLTextModel`` and
  ``lm_head`` under the ``*ForCausalLM`` shape the compiler drives.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration

from adatoken_compile.arch import from_config
from adatoken_compile.contract import DecoderInputs, EncoderGraph, Sample, Segment, collate, runtime_config
from adatoken_compile.errors import InputError
from adatoken_compile.models.checkpoint import (FIX_CONFIG, chat_prompt, config_digest, embed_token_ids, files_digest, 
                                                load_composite)
from adatoken_compile.models.llava3d import EXAMPLE_QUESTIONS, splice
from adatoken_compile.models.spec import DecoderSpec, register
from adatoken_compile.readers import read_json
from adatoken_compile.runtime.positions import LAYOUTS
from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX, PromptFormat, check_question, tokenize_with_placeholders
from adatoken_compile.runtime.qwen_vision import (QwenImageProcessing, image_list, prompt_for_images, read_frames,
                                                  token_coordinates)
from adatoken_compile.runtime.sample import Video
from adatoken_compile.runtime.sources import resolve_image
from adatoken_compile.runtime.tokenizer import TextTokenizer

MODEL_TYPE = "qwen2_5_vl"
TEXT_MODEL_TYPE = "qwen2_5_vl_text"
LAYOUT = "mrope"


# ----------------------------------------------------------------------------- decoder and spec


class TextCausalLM(nn.Module, GenerationMixin):
    """The checkpoint's text model and ``lm_head`` as a ``*ForCausalLM`` (weights shared)."""

    def __init__(self, vl: Qwen2_5_VLForConditionalGeneration):
        super().__init__()
        self.model = vl.model.language_model
        self.lm_head = vl.lm_head
        self.config = vl.config.text_config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_decoder(self) -> nn.Module:
        return self.model


class Qwen25VLSpec(DecoderSpec):
    """The base spec with M-RoPE positions ``(3, B, L)`` from each spatial token's (t, h, w)."""

    AXES = {**DecoderSpec.AXES, "position_ids": (1, 2), "decode_position_ids": (1, 2)}
    POSITION_LAYOUT = LAYOUT

    @staticmethod
    def _arrays(inputs):
        xyz = inputs.spatial_xyz
        return (inputs.attention_mask.cpu().numpy(), inputs.spatial_mask.cpu().numpy(),
                None if xyz is None else xyz.float().cpu().numpy())

    def positions(self, inputs) -> torch.Tensor:
        # the runtime's numpy builder: one definition for the compiler and the artifact runtime
        return torch.from_numpy(LAYOUTS[LAYOUT].prefill(*self._arrays(inputs)))

    def decode_positions(self, inputs, steps: int = 0) -> torch.Tensor:
        layout = LAYOUTS[LAYOUT]
        return torch.from_numpy(layout.decode(layout.start(*self._arrays(inputs)), int(steps)))

    def example_decode_positions(self, batch: int, position: int) -> torch.Tensor:
        return torch.full((3, batch, 1), int(position), dtype=torch.int64)

    def causal_mask(self, lm, hidden, attention_mask, position_ids, cache, materialize: bool):
        # the text model builds its mask without the 3-axis ids (they are not packed-sequence ids)
        return super().causal_mask(lm, hidden, attention_mask, None, cache, materialize)


SPEC = Qwen25VLSpec()
register(TEXT_MODEL_TYPE, SPEC)


# ----------------------------------------------------------------------------- vision tower


class VisionTower(nn.Module):
    """The checkpoint's vision tower on ONE image, exportable: patches and rotary ids in window
    order in, merged tokens (window order) out. The windowed blocks attend within a window
    (``window_ids``), the full-attention blocks over the whole image, as transformers' packed
    attention does per ``cu_seqlens`` segment."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.full = set(int(i) for i in visual.fullatt_block_indexes)
        self.rope = getattr(sys.modules[type(visual).__module__], "apply_rotary_pos_emb_vision")

    def forward(self, pixel_values: torch.Tensor, vision_position_ids: torch.Tensor, window_ids: torch.Tensor):
        v = self.visual
        x = v.patch_embed(pixel_values)
        cos, sin = v.rotary_pos_emb(x, vision_position_ids)
        window = (window_ids[:, None] == window_ids[None, :])[None, None]
        for i, blk in enumerate(v.blocks):
            x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, None if i in self.full else window)
            x = x + blk.mlp(blk.norm2(x))
        return v.merger(x)

    def _attention(self, attn, x, cos, sin, mask):
        n = x.shape[0]
        q, k, val = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self.rope(q, k, cos, sin)
        q, k, val = (t.transpose(0, 1)[None] for t in (q, k, val))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, val, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out[0].transpose(0, 1).reshape(n, -1))


# ----------------------------------------------------------------------------- checkpoint files

FIX_PROCESSOR = "fix or re-download the checkpoint's preprocessor_config.json"


def image_processing(model_dir: str, vision, video: bool = True) -> QwenImageProcessing:
    """The checkpoint's ``Qwen2VLImageProcessor`` settings, checked against the vision config;
    ``video``: the model takes videos (their temporal positions step by ``tokens_per_second``)."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.exists(path):
        raise InputError(f"{path}: missing; a Qwen2.5-VL checkpoint ships its image processor's settings there")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = read_json(path, "preprocessor config", FIX_PROCESSOR)
    kind = str(cfg.get("image_processor_type") or "Qwen2VLImageProcessor")
    if kind.removesuffix("Fast").removesuffix("Pil") != "Qwen2VLImageProcessor":
        raise InputError(f"{path}: image_processor_type '{kind}' is not Qwen2VLImageProcessor; {FIX_PROCESSOR}")
    try:
        p = Qwen2VLImageProcessorPil(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
        for name, mine, theirs in (("patch_size", p.patch_size, vision.patch_size),
                                   ("merge_size", p.merge_size, vision.spatial_merge_size),
                                   ("temporal_patch_size", p.temporal_patch_size, vision.temporal_patch_size)):
            if int(mine) != int(theirs):
                raise InputError(f"{name} {mine} disagrees with the vision config's {theirs} (config.json)")
        proc = QwenImageProcessing(
            min_pixels=int(p.size.shortest_edge), max_pixels=int(p.size.longest_edge), patch_size=int(p.patch_size),
            temporal_patch_size=int(p.temporal_patch_size), merge_size=int(p.merge_size),
            window_size=int(vision.window_size), resample=int(p.resample),
            rescale=float(p.rescale_factor) if p.do_rescale else None,
            mean=tuple(float(x) for x in p.image_mean) if p.do_normalize else None,
            std=tuple(float(x) for x in p.image_std) if p.do_normalize else None,
            tokens_per_second=getattr(vision, "tokens_per_second", None) if video else None)
    except InputError as e:
        raise InputError(f"{path}: {e}; {FIX_PROCESSOR}") from None
    except Exception as e:  # transformers' own validation errors and malformed values
        raise InputError(f"{path}: transformers cannot build its image processor ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); {FIX_PROCESSOR}") from None
    return proc


class Qwen25VLAdapter:
    family = "qwen2_5_vl"
    name: str | None = None  # how the user named the model (set by the registry)
    input_kind = "image"

    def __init__(self, model_dir: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
        cfg, files, vl = load_composite(model_dir, Qwen2_5_VLForConditionalGeneration, MODEL_TYPE, "a Qwen2.5-VL",
                                        attn_implementation, dtype)
        where = os.path.join(model_dir, "config.json")
        self.vl = vl.eval()
        self.decoder = TextCausalLM(vl).eval()
        self.config, self.model_dir, self.dtype = cfg, model_dir, dtype
        vcfg = vl.config.vision_config
        self.vision_config = vcfg
        if int(vcfg.out_hidden_size) != int(vl.config.text_config.hidden_size):
            raise InputError(f"{where}: vision_config.out_hidden_size {vcfg.out_hidden_size} differs from the decoder's "
                             f"hidden_size {vl.config.text_config.hidden_size}; {FIX_CONFIG}")
        self.tower = VisionTower(vl.model.visual).eval()
        self.tokenizer = TextTokenizer.from_dir(model_dir)
        self.video_token_id, self.video_refusal = _video_support(model_dir, vl.config, self.tokenizer)
        self.processing = image_processing(model_dir, vcfg, video=self.video_refusal is None)
        self.mean, self.std = self.processing.mean, self.processing.std
        ids = {}
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            tid = getattr(vl.config, key, None)
            tok = self.tokenizer.id_to_token(int(tid)) if tid is not None else None
            if tok is None:
                raise InputError(f"{where}: {key} {tid} is not a token of the checkpoint's tokenizer; {FIX_CONFIG}")
            ids[key] = tok
        self.image_token_id = int(vl.config.image_token_id)
        self.image_unit = f"{ids['vision_start_token_id']}<image>{ids['vision_end_token_id']}"
        self.prompt = chat_prompt(model_dir, self.tokenizer, ids["image_token_id"]) or PromptFormat(
            "qwen2_5_vl", f"<|im_start|>user\n{self.image_unit}{{question}}<|im_end|>\n<|im_start|>assistant\n")
        if self.image_unit not in self.prompt.format:
            raise InputError(f"{model_dir}: the chat template does not wrap the image in {ids['vision_start_token_id']}"
                             f" ... {ids['vision_end_token_id']}; fix the chat template")
        tcfg = vl.config.text_config
        eos = getattr(vl.config, "eos_token_id", None) or tcfg.eos_token_id
        self.eos_token_id = int(eos if eos is not None else self.tokenizer.eos_id)
        self.max_positions = int(tcfg.max_position_embeddings)
        self.lazy_weights = None
        self.spec = SPEC
        self._fingerprint = "sha256:" + files_digest(files, extra=config_digest(cfg))

    def fingerprint(self) -> str:
        return self._fingerprint

    def arch(self) -> dict:
        return from_config(self.decoder.config)

    def describe(self) -> dict:
        v = self.vision_config
        return {"family": self.family, **self.arch(), "attn_implementation": self.decoder.config._attn_implementation,
                "decoder_class": type(self.vl).__name__, "max_positions": self.max_positions,
                "vision": {"depth": int(v.depth), "hidden": int(v.hidden_size), "patch_size": int(v.patch_size),
                           "window_size": int(v.window_size), "fullatt_block_indexes": list(v.fullatt_block_indexes),
                           "image_processing": self.processing.to_dict()},
                "prompt": self.prompt.to_dict(), "fingerprint": self.fingerprint()}

    # ----------------------------------------------------------------- export configuration
    def example_samples(self) -> list[Sample]:
        rng = np.random.default_rng(0)
        f = self.processing.factor
        imgs = [rng.integers(0, 255, (2 * f + 5, 3 * f - 3, 3), dtype=np.uint8),
                rng.integers(0, 255, (2 * f - 1, 2 * f + 3, 3), dtype=np.uint8)]
        return [Sample(question=EXAMPLE_QUESTIONS[0], image=imgs[:1]), Sample(question=EXAMPLE_QUESTIONS[1], image=imgs)]

    def encoder_graphs(self) -> list[EncoderGraph]:
        """encoder: one image's patches (window order) -> its merged tokens in decoder space."""
        rng = np.random.default_rng(0)
        f = self.processing.factor
        img = rng.integers(0, 255, (3 * f, 4 * f + 7, 3), dtype=np.uint8)
        feeds = self.processing.encoder_feeds(*self.processing.patches(img))
        args = (torch.from_numpy(feeds["pixel_values"]).to(self.dtype), torch.from_numpy(feeds["vision_position_ids"]),
                torch.from_numpy(feeds["window_ids"]))
        # the merger reads patches in 2x2 blocks: the patch axis is a multiple of merge_size**2
        patches = self.processing.merge_size ** 2 * torch.export.Dim("merged_tokens", min=2, max=1 << 18)
        return [EncoderGraph("encoder", self.tower, args, ({0: patches}, {0: patches}, {0: patches}),
                             ["pixel_values", "vision_position_ids", "window_ids"], ["features"])]

    def runtime_config(self) -> dict:
        side = int(self.processing.max_pixels ** 0.5)
        return runtime_config(self, self.input_kind, max(side, self.processing.factor), self.processing.factor,
                              image_unit=self.image_unit)

    def prompt_ids(self, question: str, images: int = 1) -> list[int]:
        fmt = prompt_for_images(self.prompt.format, images, self.image_unit)
        return tokenize_with_placeholders(self.tokenizer, fmt.replace(self.prompt.field, check_question(question)))

    def embed_ids(self, ids) -> torch.Tensor:
        return embed_token_ids(self.decoder, ids)

    def pixels(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(N, patch_dim) patches and (3,) grid_thw of one image (array, path or reference) or
        :class:`Video`."""
        return self._patches(self.read_video(image) if isinstance(image, Video) else image)

    def _patches(self, image) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`pixels` of an image, or of a video whose frames are read (:meth:`read_video`)."""
        if isinstance(image, Video):
            return self.processing.video_patches(image.frames)
        return self.processing.patches(resolve_image(image))

    def read_video(self, video: Video) -> Video:
        """``video`` with its frames read (a video file's decoded and sampled at its fps)."""
        if self.video_refusal:
            raise InputError(self.video_refusal)
        return read_frames(video, resolve_image, self.processing.temporal_patch_size)

    @torch.no_grad()
    def image_tokens(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) merged tokens of ONE image or video through transformers' own tower, and their
        (t, h, w)."""
        video = isinstance(image, Video)
        if video:  # a video file's frames and the rate they were sampled at, read once
            image = self.read_video(image)
        pix, grid = self._patches(image)
        features = self.vl.model.get_video_features if video else self.vl.model.get_image_features
        feats = features(torch.from_numpy(pix).to(self.dtype), torch.from_numpy(grid[None])).pooler_output[0]
        interval = self.processing.time_interval(image) if video else 1.0
        return feats, torch.from_numpy(token_coordinates(grid, self.processing.merge_size, interval))

    def spatial_tokens_xyz(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) tokens and (N, 3) (t, h, w) of a sample's image(s), images one after another
        (a selection rule sees each image's own grid)."""
        parts = [self.image_tokens(im) for im in image_list(image)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def segment(self, sample: Sample, spatial: torch.Tensor | None = None, xyz: torch.Tensor | None = None) -> Segment:
        if sample.image is None:
            raise InputError("Qwen2.5-VL sample without an image: pass --image IMG, or --data with a question file "
                             "whose questions name an 'image'")
        images = image_list(sample.image)
        parts = [self.image_tokens(im) for im in images] if spatial is None else None
        ids = self.prompt_ids(sample.question, len(images))
        if spatial is not None:  # already encoded: split back per image by the placeholder count
            parts = _split_images(spatial, xyz, len(images))
        return splice(ids, self.embed_ids, [(tok.to(self.dtype), c) for tok, c in parts])

    def prepare(self, samples: Sequence[Sample]) -> DecoderInputs:
        return collate([self.segment(s) for s in samples])

    # ----------------------------------------------------------------- transformers' own inputs
    def hf_inputs(self, samples: Sequence[Sample]) -> dict:
        """``input_ids`` (left-padded), ``attention_mask``, ``pixel_values`` / ``image_grid_thw``,
        ``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts`` and
        ``mm_token_type_ids`` for ``Qwen2_5_VLForConditionalGeneration`` (the reference the
        adapter is tested against)."""
        rows, types = [], []
        parts: dict[bool, list] = {False: [], True: []}
        seconds = []
        unit = self.processing.merge_size ** 2
        for s in samples:
            items = [self.read_video(im) if isinstance(im, Video) else im for im in image_list(s.image)]
            mine = [(isinstance(im, Video), *self._patches(im)) for im in items]
            for im, (video, p, g) in zip(items, mine):
                parts[video].append((p, g))
                if video:
                    seconds.append(self.processing.temporal_patch_size / im.fps)
            spans = iter(mine)
            row, kind = [], []
            for t in self.prompt_ids(s.question, len(items)):
                if t == IMAGE_TOKEN_INDEX:
                    video, _, g = next(spans)
                    n = int(np.prod(g)) // unit
                    row += [self.video_token_id if video else self.image_token_id] * n
                    kind += [2 if video else 1] * n
                else:
                    row.append(t)
                    kind.append(0)
            rows.append(row)
            types.append(kind)
        L = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id or 0
        out = {"input_ids": torch.tensor([[pad] * (L - len(r)) + r for r in rows]),
               "attention_mask": torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows]),
               "mm_token_type_ids": torch.tensor([[0] * (L - len(k)) + k for k in types], dtype=torch.int32)}
        for video, (pix, grid) in ((False, ("pixel_values", "image_grid_thw")),
                                   (True, ("pixel_values_videos", "video_grid_thw"))):
            if parts[video]:
                out[pix] = torch.from_numpy(np.concatenate([p for p, _ in parts[video]])).to(self.dtype)
                out[grid] = torch.from_numpy(np.stack([g for _, g in parts[video]]))
        if seconds:
            out["second_per_grid_ts"] = torch.tensor(seconds)
        return out


def _video_support(model_dir: str, config, tokenizer) -> tuple[int | None, str | None]:
    """(``video_token_id``, None) when the checkpoint takes videos, else (None, why not: the line
    a video given to it raises)."""
    where = os.path.join(model_dir, "config.json")
    tid = getattr(config, "video_token_id", None)
    if tid is None or tokenizer.id_to_token(int(tid)) is None:
        return None, (f"video: {where} names no video_token_id of its tokenizer, so the checkpoint takes no "
                      "video; pass the frames as images")
    if getattr(config.vision_config, "tokens_per_second", None) is None:
        return None, (f"video: {where} has no vision_config.tokens_per_second, so the checkpoint takes no video; "
                      "pass the frames as images")
    path = os.path.join(model_dir, "video_preprocessor_config.json")
    if os.path.exists(path):
        return None, (f"video: {path}: videos sized by a video processor of their own are not supported; pass the "
                      "frames as images")
    return int(tid), None


def _split_images(spatial: torch.Tensor, xyz: torch.Tensor | None, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (tokens, (t, h, w)) from tokens encoded back to back: an image starts where the
    coordinates return to (0, 0, 0)."""
    if xyz is None:
        raise InputError("Qwen2.5-VL tokens given without their (t, h, w) coordinates")
    starts = [i for i in range(xyz.shape[0]) if not bool(xyz[i].abs().sum())]
    if len(starts) != n:
        raise InputError(f"{len(starts)} images' tokens for a prompt with {n} image placeholders")
    bounds = starts + [xyz.shape[0]]
    return [(spatial[a:b], xyz[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
