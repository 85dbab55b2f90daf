"""HF LLaVA adapter: ``LlavaForConditionalGeneration`` checkpoints (Llama or Qwen2 decoders).

The image tokens play the role of the spatial tokens. The decoder handed to the compiler is the
installed ``*ForCausalLM`` class sharing the LLaVA checkpoint's language model and lm_head.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, Qwen2ForCausalLM

from adatoken_compile.arch import from_config
from adatoken_compile.contract import DecoderInputs, EncoderGraph, Sample, Segment, collate, runtime_config
from adatoken_compile.runtime.sources import resolve_image
from adatoken_compile.errors import InputError
from adatoken_compile.models.checkpoint import (chat_prompt, config_digest, embed_token_ids, files_digest, image_processing, 
                                                load_composite)
from adatoken_compile.models.llava3d import EXAMPLE_QUESTIONS, splice
from adatoken_compile.models.spec import spec_for
from adatoken_compile.runtime.image import patch_coordinates
from adatoken_compile.runtime.sample import Video
from adatoken_compile.runtime.prompt import IMAGE_TOKEN_INDEX, PromptFormat, check_question, tokenize_with_placeholders
from adatoken_compile.runtime.tokenizer import TextTokenizer


class ImageEncoder(nn.Module):
    """vision tower -> selected layer (CLS dropped for 'default') -> multi-modal projector."""

    def __init__(self, vision: nn.Module, projector: nn.Module, layer: int, strategy: str):
        super().__init__()
        self.vision, self.projector, self.layer, self.strategy = vision, projector, layer, strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hs = self.vision(pixel_values, output_hidden_states=True).hidden_states[self.layer]
        if self.strategy == "default":
            hs = hs[:, 1:]
        return self.projector(hs)


class LlavaHFAdapter:
    family = "llava-hf"
    name: str | None = None  # how the user named the model (set by the registry)
    input_kind = "image"

    def __init__(self, model_dir: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
        cfg, files, llava = load_composite(model_dir, LlavaForConditionalGeneration, "llava", "an HF LLaVA",
                                           attn_implementation, dtype)
        where = os.path.join(model_dir, "config.json")
        tcfg = llava.config.text_config
        cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}.get(tcfg.model_type)
        if cls is None:
            raise InputError(f"{where}: text_config.model_type '{tcfg.model_type}' unsupported (llama or qwen2)")
        with torch.device("meta"):
            lm = cls(tcfg)
        lm.model = llava.model.language_model
        lm.lm_head = llava.lm_head
        lm.eval()
        self.decoder = lm
        self.llava = llava
        self.config = cfg
        self.model_dir = model_dir
        vcfg = llava.config.vision_config
        self.encoder = ImageEncoder(
            llava.model.vision_tower,
            llava.model.multi_modal_projector,
            int(llava.config.vision_feature_layer),
            llava.config.vision_feature_select_strategy,
        ).eval()
        self.image_size = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.processing = image_processing(model_dir, self.image_size)
        self.mean, self.std = self.processing.mean, self.processing.std
        self.image_token_id = int(llava.config.image_token_id)
        self.tokenizer = TextTokenizer.from_dir(model_dir)
        image_token = self.tokenizer.id_to_token(self.image_token_id) or "<image>"
        self.prompt = chat_prompt(model_dir, self.tokenizer, image_token) or PromptFormat.builtin("llava_hf")
        self.eos_token_id = int(tcfg.eos_token_id if tcfg.eos_token_id is not None else self.tokenizer.eos_id)
        self.max_positions = int(tcfg.max_position_embeddings)
        self.dtype = dtype
        self.lazy_weights = None  # HF LLaVA checkpoints load in memory
        self.spec = spec_for(self.decoder)
        self._fingerprint = "sha256:" + files_digest(files, extra=config_digest(cfg))

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {
            "family": self.family,
            **self.arch(),
            "attn_implementation": self.decoder.config._attn_implementation,
            "decoder_class": type(self.decoder).__name__,
            "max_positions": self.max_positions,
            "vision": {"image_size": self.image_size, "patch_size": self.patch_size,
                       "image_processing": self.processing.to_dict()},
            "prompt": self.prompt.to_dict(),
            "fingerprint": self.fingerprint(),
        }

    def arch(self) -> dict:
        return from_config(self.decoder.config)

    # ----------------------------------------------------------------- export configuration
    def example_samples(self) -> list[Sample]:
        rng = np.random.default_rng(0)
        img = rng.integers(0, 255, (self.image_size + 8, self.image_size + 4, 3), dtype=np.uint8)
        return [Sample(question=q, image=img) for q in EXAMPLE_QUESTIONS]

    def encoder_graphs(self) -> list[EncoderGraph]:
        """encoder: pixel values -> image tokens in decoder space (tower, feature layer, projector)."""
        rng = np.random.default_rng(0)
        pix = torch.from_numpy(rng.standard_normal((2, 3, self.image_size, self.image_size)).astype(np.float32))
        images = torch.export.Dim("images", min=1, max=4096)
        return [EncoderGraph("encoder", self.encoder, (pix.to(self.dtype),), ({0: images},), ["pixel_values"],
                             ["features"])]

    def runtime_config(self) -> dict:
        return runtime_config(self, self.input_kind, self.image_size, self.patch_size)

    def prompt_ids(self, question: str) -> list[int]:
        return tokenize_with_placeholders(self.tokenizer, self.prompt.text(check_question(question)))

    @torch.no_grad()
    def spatial_tokens(self, image) -> torch.Tensor:
        """(N, H) image tokens of an (H, W, 3) uint8 image (or an image path / a sample's image reference)."""
        pix = self.processing(resolve_image(image))
        return self.encoder(torch.from_numpy(pix)[None].to(self.dtype))[0]

    def embed_ids(self, ids) -> torch.Tensor:
        return embed_token_ids(self.decoder, ids)

    def spatial_tokens_xyz(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) image tokens and their (row, col, 0) patch coordinates (N, 3)."""
        tokens = self.spatial_tokens(image)
        return tokens, torch.from_numpy(patch_coordinates(tokens.shape[0]))

    @torch.no_grad()
    def segment(self, sample: Sample, spatial: torch.Tensor | None = None, xyz: torch.Tensor | None = None) -> Segment:
        if sample.image is None:
            raise InputError("HF LLaVA sample without an image: pass --image IMG, or --data with a question file whose "
                             "questions name an 'image'")
        if isinstance(sample.image, (list, tuple)):
            raise InputError(f"{len(sample.image)} images in one question: an HF LLaVA prompt holds one image; "
                             "ask about one image at a time")
        if isinstance(sample.image, Video):
            raise InputError("video: an HF LLaVA prompt holds one image, not a video; ask about one frame at a time")
        ids = self.prompt_ids(sample.question)
        if IMAGE_TOKEN_INDEX not in ids:
            raise InputError("prompt lost its <image> placeholder")
        if spatial is None:
            spatial, xyz = self.spatial_tokens_xyz(sample.image)
        return splice(ids, self.embed_ids, spatial, xyz=xyz)

    def prepare(self, samples: Sequence[Sample]) -> DecoderInputs:
        return collate([self.segment(s) for s in samples])
