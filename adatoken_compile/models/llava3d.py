"""LLaVA-3D adapter: a checkpoint directory in the released LLaVA-3D-7B layout -> contract.

Forward path (released code, see shared docs/llava3d.md):
views -> CLIP (penultimate layer, CLS dropped) -> + 3D position embedding(xyz of each patch's
top-left pixel) -> voxel pooling (0.2 m, x-major key order, mean) -> mlp2x_gelu projector ->
spliced at the image placeholder (-200) of the llava_v1 prompt -> the installed HF decoder.

Everything runs on installed transformers classes (CLIPVisionModel, LlamaForCausalLM /
Qwen2ForCausalLM); nothing of transformers is patched.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.initialization import no_init_weights

from adatoken_compile.arch import check_config, from_config, parameter_count
from adatoken_compile.contract import DecoderInputs, EncoderGraph, Sample, Segment, collate, runtime_config
from adatoken_compile.runtime.sources import DEFAULT_NUM_FRAMES, check_num_frames, resolve_scene
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import spec_for
from adatoken_compile.readers import Fields
from adatoken_compile.runtime.prompt import (
    BOXES_TOKEN_INDEX,
    IMAGE_TOKEN_INDEX,
    PromptFormat,
    check_question,
    tokenize_with_placeholders,
)
from adatoken_compile.runtime.scene import (MAX_SPATIAL_TOKENS, VOXEL_SIZE, Scene, preprocess_scene, unproject_patches,
                                            voxelize)
from adatoken_compile.runtime.tokenizer import TextTokenizer

from adatoken_compile.models.checkpoint import (FIX_CONFIG, LazyWeights, assign_exact, chat_prompt, check_weight_bytes,
                                                config_digest, embed_token_ids, files_digest, image_processing, load_state_dict,
                                                read_config, weight_files)

PE_PREFIX = "model.video_tower.video_tower.positional_embedding."
BOX_PREFIX = "model.video_tower.prompt_encoder.pos_emb3d."
PROJ_PREFIX = "model.mm_projector."
# CLIP weights stored inside a LLaVA checkpoint are ignored upstream (the tower loads separately)
IGNORED_PREFIXES = ("model.vision_tower.", "model.video_tower.video_tower.vision_tower.")
LLAVA3D_ONLY_KEYS = {
    "model_type", "architectures", "num_frames", "num_sample_tokens", "tokenizer_model_max_length",
    "tokenizer_padding_side", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "image_aspect_ratio",
    "use_mm_proj", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map",
}


class PositionEmbedding3D(nn.Module):
    """Linear(3,D) -> LayerNorm -> ReLU -> Linear(D,D), on raw metres (checkpoint indices 0,1,3)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Linear(dim_in, dim), nn.LayerNorm(dim), nn.ReLU(inplace=False), nn.Linear(dim, dim)
        )

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.position_embedding_head(xyz)


def build_projector(kind: str, dim_in: int, dim_out: int, where: str) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Linear(dim_in, dim_out))
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(dim_in, dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
    raise InputError(f"{where}: mm_projector_type '{kind}' unsupported (expected 'mlp2x_gelu' or 'linear')")


class SpatialEncoder(nn.Module):
    """Per-view CLIP patch features + 3D position embedding (vision space): (V,3,S,S),(V,P,3) -> (V,P,Dv).

    Exported to ONNX as the artifact's encoder graph; voxel pooling (data-dependent) follows in numpy.
    """

    def __init__(self, vision: nn.Module, pe: nn.Module, select_layer: int, select_feature: str):
        super().__init__()
        self.vision = vision
        self.pe = pe
        self.select_layer = select_layer
        self.select_feature = select_feature

    def forward(self, pixel_values: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats + self.pe(xyz.to(feats.dtype))


def decoder_classes(cfg: dict, where: str):
    mt = str(cfg.get("model_type", "")).lower()
    names = cfg.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{where}: 'architectures' must be a list of class names; {FIX_CONFIG}")
    arch = " ".join(names).lower()
    if "qwen" in mt or "qwen" in arch:
        return Qwen2Config, Qwen2ForCausalLM
    if "llama" in mt or "llama" in arch:
        return LlamaConfig, LlamaForCausalLM
    raise InputError(f"{where}: model_type '{mt}' is not a LLaVA-3D decoder (expected llava_llama or llava_qwen)")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (no float32 copy first: a 7B decoder is 28 GB in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _new_module(cls, config, where: str, dtype: torch.dtype = torch.float32):
    """``cls(config)`` in ``dtype`` with uninitialised weights (their memory is untouched until
    written); a config value the class cannot build from (an unknown activation, malformed rope
    settings) is one line naming the config file."""
    try:
        with no_init_weights(), default_dtype(dtype):
            return cls(config)
    except Exception as e:  # transformers raises KeyError, ValueError, TypeError... for config values
        raise InputError(f"{where}: {cls.__name__} cannot be built from this config ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); {FIX_CONFIG}") from None


def _local_vision_dir(model_dir: str, cfg: dict, override: str | None, where: str) -> str:
    name = override or cfg.get("mm_vision_tower")
    if not name:
        raise InputError(f"{where}: no mm_vision_tower in config.json; pass --vision-tower DIR")
    if not isinstance(name, str):
        raise InputError(f"{where}: 'mm_vision_tower' must be a directory name, got {type(name).__name__}; "
                         "pass --vision-tower DIR")
    # the config's name is relative to the checkpoint, never to the current directory (where an
    # unrelated ./vision_tower would load silently); --vision-tower is the user's own path
    cands = [name] if override or os.path.isabs(name) else [os.path.join(model_dir, name)]
    for c in cands:
        if os.path.isdir(c):
            return c
    raise InputError(
        f"{where}: vision tower '{name}' is not a local directory (looked for {cands[0]}; nothing is downloaded); "
        "pass --vision-tower DIR pointing at a local CLIP vision checkpoint"
    )


EXAMPLE_QUESTIONS = ("what is in the room?", "how many chairs are next to the big table by the window?")


def example_scene(num_views: int = 3, H: int = 60, W: int = 80, seed: int = 0) -> Scene:
    """A small deterministic scene (random colours, depths 1-4 m): only shapes matter for export."""
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (num_views, 1, 1))
    poses[:, 0, 3] = np.arange(num_views) * 0.5
    K = np.tile(np.eye(4), (num_views, 1, 1))
    K[:, 0, 0] = K[:, 1, 1] = 60.0
    K[:, 0, 2], K[:, 1, 2] = W / 2, H / 2
    return Scene(
        rng.integers(0, 255, (num_views, H, W, 3), dtype=np.uint8),
        rng.uniform(1.0, 4.0, (num_views, H, W)).astype(np.float32),
        poses,
        K,
        name="<compile example>",
    )


class Llava3DAdapter:
    family = "llava3d"
    name: str | None = None  # how the user named the model (set by the registry)
    input_kind = "scene"

    def __init__(
        self,
        model_dir: str,
        vision_tower: str | None = None,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        lazy: bool = False,
    ):
        """``dtype``: every module's parameters (built directly in it). ``lazy``: the decoder's
        weights (but the input embeddings) stay on disk, recorded in :attr:`lazy_weights`, and are
        read one at a time when ``compile`` writes them; such an adapter can only be compiled."""
        self.model_dir = model_dir
        cfg = read_config(model_dir)
        where = os.path.join(model_dir, "config.json")
        num_frames = check_num_frames(DEFAULT_NUM_FRAMES if cfg.get("num_frames") is None else cfg["num_frames"], where)
        mm = Fields(cfg, where, FIX_CONFIG)
        if not mm.string("model_type").startswith("llava"):
            raise InputError(f"{where}: model_type '{cfg.get('model_type')}' is not a LLaVA-3D checkpoint (llava_llama)")
        self.config = cfg
        cfg_cls, lm_cls = decoder_classes(cfg, where)
        files = weight_files(model_dir)
        check_weight_bytes(parameter_count(check_config(cfg, where, FIX_CONFIG)), files, where)
        dec_cfg = _hf_config(cfg_cls, {k: v for k, v in cfg.items() if k not in LLAVA3D_ONLY_KEYS and not k.startswith("mm_")},
                             where)
        dec_cfg._attn_implementation = attn_implementation
        self.decoder = _new_module(lm_cls, dec_cfg, where, dtype=dtype).eval()

        # ------------------------------------------------------------- vision tower (local dir)
        self.vision_dir = _local_vision_dir(model_dir, cfg, vision_tower, where)
        vfiles = weight_files(self.vision_dir)
        vcfg = _vision_config(self.vision_dir, vfiles)
        vcfg._attn_implementation = "eager" if attn_implementation == "eager" else "sdpa"
        vision = _new_module(CLIPVisionModel, vcfg, os.path.join(self.vision_dir, "config.json"), dtype=dtype)
        vsd = load_state_dict(vfiles)
        if vsd and not next(iter(vsd)).startswith("vision_model."):
            vsd = {k.split("vision_tower.", 1)[-1] if "vision_tower." in k else k: v for k, v in vsd.items()}
        vsd = {k: v for k, v in vsd.items() if not k.startswith("text_model.") and k not in ("logit_scale",)}
        vsd = {k: v for k, v in vsd.items() if not k.startswith(("visual_projection", "text_projection"))}
        vsd = {k: v for k, v in vsd.items() if not k.endswith("position_ids")}
        assign_exact(vision, vsd, self.vision_dir)
        self.image_size = int(vcfg.image_size)
        self.processing = image_processing(self.vision_dir, self.image_size)
        self.mean, self.std = self.processing.mean, self.processing.std
        self.patch_size = int(vcfg.patch_size)
        self.num_frames = num_frames  # views selected from scan folders

        dv = mm.integer("mm_hidden_size", lo=1, default=int(vcfg.hidden_size))
        if dv != int(vcfg.hidden_size):
            mm.fail("mm_hidden_size", f"the vision tower's hidden_size ({vcfg.hidden_size})", dv)
        h = int(dec_cfg.hidden_size)
        self.pe3d = PositionEmbedding3D(3, dv)
        self.projector = build_projector(mm.string("mm_projector_type", default="mlp2x_gelu"), dv, h, where)
        self.box_pe = PositionEmbedding3D(3, h)
        n_states = int(vcfg.num_hidden_layers) + 1  # hidden_states: the embeddings, then every layer
        feature = mm.string("mm_vision_select_feature", choices=("patch", "cls_patch"), default="patch")
        if feature == "cls_patch":  # every spatial token needs a 3D position; the CLS token has none
            mm.fail("mm_vision_select_feature", "'patch' (cls_patch adds a CLS token that has no 3D position, which "
                    "LLaVA-3D's spatial tokens need)", feature)
        self.encoder = SpatialEncoder(
            vision, self.pe3d, mm.integer("mm_vision_select_layer", lo=-n_states, hi=n_states - 1, default=-2),
            feature,
        ).to(dtype).eval()

        # ------------------------------------------------------------- LLaVA-3D weights
        embed_key = "model.embed_tokens.weight"
        sd = load_state_dict(files, on_disk=(lambda k: k != embed_key and not k.startswith(
            (PE_PREFIX, BOX_PREFIX, PROJ_PREFIX) + IGNORED_PREFIXES)) if lazy else None)
        sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
        parts = {"pe": {}, "box": {}, "proj": {}, "dec": {}}
        for k, v in sd.items():
            if k.startswith(PE_PREFIX):
                parts["pe"][k[len(PE_PREFIX):]] = v
            elif k.startswith(BOX_PREFIX):
                parts["box"][k[len(BOX_PREFIX):]] = v
            elif k.startswith(PROJ_PREFIX):
                parts["proj"][k[len(PROJ_PREFIX):]] = v
            else:
                parts["dec"][k] = v
        if getattr(dec_cfg, "tie_word_embeddings", False):
            parts["dec"].pop("lm_head.weight", None)
            dsd = self.decoder.state_dict()
            parts["dec"]["lm_head.weight"] = parts["dec"].get("model.embed_tokens.weight", dsd["lm_head.weight"])
        where_w = os.path.join(model_dir, os.path.basename(files[0]) if len(files) == 1 else "model.safetensors.index.json")
        self.lazy_weights = LazyWeights()
        assign_exact(self.decoder, parts["dec"], where_w, lazy=self.lazy_weights)
        assign_exact(self.pe3d, parts["pe"], where_w, prefix=PE_PREFIX)
        assign_exact(self.projector, parts["proj"], where_w, prefix=PROJ_PREFIX)
        self.has_boxes = bool(parts["box"])
        if self.has_boxes:
            assign_exact(self.box_pe, parts["box"], where_w, prefix=BOX_PREFIX)
        for m in (self.pe3d, self.projector, self.box_pe):
            m.to(dtype).eval()
        self.dtype = dtype
        self.spec = spec_for(self.decoder)

        self.tokenizer = TextTokenizer.from_dir(model_dir)
        self.prompt = chat_prompt(model_dir, self.tokenizer) or PromptFormat.builtin("llava_v1")
        eos = mm.integer("eos_token_id", lo=0, hi=int(dec_cfg.vocab_size) - 1, default=None, null=True)
        self.eos_token_id = eos if eos is not None else (self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 2)
        self.max_positions = mm.integer("max_position_embeddings", lo=1, default=4096)
        self._fingerprint = "sha256:" + files_digest(
            list(files) + list(vfiles), extra=config_digest(cfg) + config_digest(vcfg.to_dict())
        )

    # ----------------------------------------------------------------- contract
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {
            "family": self.family,
            **self.arch(),
            "attn_implementation": self.decoder.config._attn_implementation,
            "decoder_class": type(self.decoder).__name__,
            "max_positions": self.max_positions,
            "vision": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "patches_per_view": (self.image_size // self.patch_size) ** 2,
                "hidden": int(self.encoder.vision.config.hidden_size),
                "layers": int(self.encoder.vision.config.num_hidden_layers),
                "image_processing": self.processing.to_dict(),
            },
            "num_frames": self.num_frames,
            "prompt": self.prompt.to_dict(),
            "fingerprint": self.fingerprint(),
        }

    def arch(self) -> dict:
        return from_config(self.decoder.config)

    # ----------------------------------------------------------------- export configuration
    def example_samples(self) -> list[Sample]:
        scene = example_scene()
        return [Sample(question=q, scene=scene) for q in EXAMPLE_QUESTIONS]

    def encoder_graphs(self) -> list[EncoderGraph]:
        """encoder: views + patch xyz -> vision-space features; projector: pooled features -> tokens
        (voxel pooling between them is data-dependent and runs in numpy)."""
        pre = preprocess_scene(example_scene(), self.image_size, processing=self.processing)
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, self.patch_size)
        views = torch.export.Dim("views", min=1, max=4096)
        tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
        feats = torch.randn(max(voxelize(xyz).num_tokens, 3), int(self.pe3d.position_embedding_head[0].out_features))
        return [
            EncoderGraph("encoder", self.encoder, (torch.from_numpy(pre.pixel_values).to(self.dtype), torch.from_numpy(xyz)),
                         ({0: views}, {0: views}), ["pixel_values", "xyz"], ["features"]),
            EncoderGraph("projector", self.projector, (feats.to(self.dtype),), ({0: tokens},), ["features"], ["tokens"]),
        ]

    def runtime_config(self) -> dict:
        return runtime_config(self, self.input_kind, self.image_size, self.patch_size, voxel_size=VOXEL_SIZE,
                              max_tokens=MAX_SPATIAL_TOKENS, num_frames=self.num_frames)

    def prompt_ids(self, question: str) -> list[int]:
        return tokenize_with_placeholders(self.tokenizer, self.prompt.text(check_question(question)))

    @torch.no_grad()
    def spatial_features(self, scene) -> tuple[torch.Tensor, np.ndarray]:
        """Vision-space features per patch (V*P, Dv) and patch xyz (V*P, 3), before pooling.
        ``scene``: a Scene, a scene path or folder, or a sample's scene reference."""
        scene = resolve_scene(scene, self.num_frames)
        pre = preprocess_scene(scene, self.image_size, processing=self.processing)
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, self.patch_size)
        feats = self.encoder(torch.from_numpy(pre.pixel_values).to(self.dtype), torch.from_numpy(xyz))
        return feats.reshape(-1, feats.shape[-1]), xyz.reshape(-1, 3)

    @torch.no_grad()
    def spatial_tokens(self, scene) -> torch.Tensor:
        """(N, H) decoder-space spatial tokens of a scene."""
        return self.spatial_tokens_xyz(scene)[0]

    @torch.no_grad()
    def spatial_tokens_xyz(self, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) decoder-space spatial tokens of a scene and their voxel centres (N, 3) in metres."""
        feats, xyz = self.spatial_features(scene)
        vmap = voxelize(xyz)
        return self.projector(pool_torch(feats, vmap)), torch.from_numpy(vmap.centers)

    def embed_ids(self, ids) -> torch.Tensor:
        return embed_token_ids(self.decoder, ids)

    @torch.no_grad()
    def segment(self, sample: Sample, spatial: torch.Tensor | None = None, xyz: torch.Tensor | None = None) -> Segment:
        """One sample's spliced row; ``spatial`` / ``xyz``: the scene's tokens and voxel centres when
        already encoded (several questions on one scene encode it once)."""
        if sample.scene is None:
            raise InputError("LLaVA-3D sample without a scene: pass --scene S.npz")
        ids = self.prompt_ids(sample.question)
        if spatial is None:
            spatial, xyz = self.spatial_tokens_xyz(sample.scene)
        return splice(ids, self.embed_ids, spatial, self._box_tokens(sample, ids), xyz)

    def _box_tokens(self, sample: Sample, ids: list[int]) -> torch.Tensor | None:
        nb = ids.count(BOXES_TOKEN_INDEX)
        if nb == 0:
            return None
        if not self.has_boxes:
            raise InputError(f"{self.model_dir}: question uses <boxes> but the checkpoint has no prompt_encoder weights")
        boxes = np.asarray(sample.boxes if sample.boxes is not None else [], np.float32).reshape(-1, 3)
        if boxes.shape[0] != nb:
            raise InputError(f"question has {nb} <boxes> placeholder(s) but {boxes.shape[0]} box location(s) were given (M,3)")
        with torch.no_grad():
            return self.box_pe(torch.from_numpy(boxes).to(self.dtype))

    def prepare(self, samples: Sequence[Sample]) -> DecoderInputs:
        cache: dict[int, tuple] = {}
        rows = []
        for s in samples:
            key = id(s.scene)
            if key not in cache:
                cache[key] = self.spatial_tokens_xyz(s.scene)
            rows.append(self.segment(s, *cache[key]))
        return collate(rows)


def pool_torch(feats: torch.Tensor, vmap) -> torch.Tensor:
    """Mean of patch features per voxel token (same arithmetic as scene.pool_numpy)."""
    inv = torch.from_numpy(vmap.inverse)
    valid = inv >= 0
    out = torch.zeros(vmap.num_tokens, feats.shape[1], dtype=feats.dtype)
    out.index_add_(0, inv[valid], feats[valid])
    counts = torch.bincount(inv[valid], minlength=vmap.num_tokens).to(feats.dtype)
    return out / counts[:, None]


def splice(ids: list[int], embed, spatial, boxes: torch.Tensor | None = None,
           xyz: torch.Tensor | None = None) -> Segment:
    """Replace the image placeholder by the spatial tokens (and <boxes> by box tokens); ``xyz``:
    the spatial tokens' coordinates (N, 3), placed on them (0 on every other token). ``spatial``
    may instead be a list of (tokens, coordinates) pairs, one per placeholder (several images)."""
    parts = list(spatial) if isinstance(spatial, (list, tuple)) else [(spatial, xyz)]
    if ids.count(IMAGE_TOKEN_INDEX) != len(parts):
        want = "one <image> placeholder" if len(parts) == 1 else f"{len(parts)} <image> placeholders"
        raise InputError(f"prompt must hold exactly {want}, found {ids.count(IMAGE_TOKEN_INDEX)}")
    with_xyz = any(c is not None for _, c in parts)
    pieces, mask, coords, text, bi, ii = [], [], [], [], 0, 0

    def flush():
        if text:
            pieces.append(embed(text))
            mask.append(torch.zeros(len(text), dtype=torch.bool))
            coords.append(torch.zeros(len(text), 3))
            text.clear()

    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            flush()
            tokens, c = parts[ii]
            ii += 1
            pieces.append(tokens.to(pieces[0].dtype if pieces else tokens.dtype))
            mask.append(torch.ones(tokens.shape[0], dtype=torch.bool))
            coords.append(c.float() if c is not None else torch.zeros(tokens.shape[0], 3))
        elif t == BOXES_TOKEN_INDEX:
            flush()
            pieces.append(boxes[bi : bi + 1])
            mask.append(torch.zeros(1, dtype=torch.bool))
            coords.append(torch.zeros(1, 3))
            bi += 1
        else:
            text.append(t)
    flush()
    return Segment(torch.cat(pieces, 0), torch.cat(mask, 0), torch.cat(coords, 0) if with_xyz else None)


def _hf_config(cls, fields: dict, where: str):
    """A transformers config from checkpoint fields; its own validation errors as one line."""
    try:
        return cls(**fields)
    except Exception as e:  # transformers raises TypeError, ValueError and its own validation errors
        raise InputError(f"{where}: {str(e).strip().splitlines()[-1].strip()[:200]}; {FIX_CONFIG}") from None


def _vision_config(vision_dir: str, files: list[str]):
    """The CLIP tower's config, field types checked before transformers reads it, its size against
    its weights' before a module is built."""
    raw = read_config(vision_dir)
    where = os.path.join(vision_dir, "config.json")
    f = Fields(raw, where, FIX_CONFIG)
    hidden, layers = f.integer("hidden_size", lo=1, hi=1 << 15, default=768), f.integer("num_hidden_layers", lo=1, hi=256, default=12)
    inter = f.integer("intermediate_size", lo=1, hi=1 << 17, default=3072)
    heads = f.integer("num_attention_heads", lo=1, hi=hidden, default=12)
    size, patch = f.integer("image_size", lo=1, hi=4096, default=224), f.integer("patch_size", lo=1, hi=4096, default=32)
    if hidden % heads:
        f.fail("hidden_size", f"a multiple of num_attention_heads ({heads})", hidden)
    if patch > size:
        f.fail("patch_size", f"at most image_size ({size})", patch)
    check_weight_bytes(layers * (4 * hidden * hidden + 2 * hidden * inter) + ((size // patch) ** 2 + 1) * hidden,
                       files, where)
    try:
        return CLIPVisionConfig.from_pretrained(vision_dir, local_files_only=True)
    except Exception as e:  # transformers' own validation errors
        raise InputError(f"{where}: {str(e).strip().splitlines()[-1].strip()[:200]}; {FIX_CONFIG}") from None
