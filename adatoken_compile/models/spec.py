"""The decoder spec: what a model family's decoder looks like to the executor, the pass and decode.

Every piece of the compiler that runs, captures or rewrites a decoder asks the spec of that decoder
instead of assuming Llama: the prefill executor (:mod:`adatoken_compile.compiler.executor`) iterates
layers and recomputes queries through it, the token-drop pass finds layers and attention ops in a
captured graph through it, and the decode step continues positions through it. Nothing outside
``models/`` names a family or a position layout.

:class:`DecoderSpec` is the base: the installed transformers Llama / Qwen2 decoders (the LLaVA-3D
layout and HF LLaVA both ship one) with one position id per token, ``position_ids (B, L)``, and RoPE
tables ``cos`` / ``sin (B, L, head_dim)`` computed once by ``model.rotary_emb``. A family whose
positions differ (M-RoPE's ``(3, B, L)`` ids) subclasses it and overrides only what differs, as
ONNX Runtime GenAI's model builder does per family; :func:`register` makes it the spec of its
``model_type``.

>>> spec = spec_for(decoder_lm)            # doctest: +SKIP
>>> spec.position_axes("position_ids")      # doctest: +SKIP
(0, 1)
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from adatoken_compile.errors import InputError


def gather_rows(x: torch.Tensor, idx: torch.Tensor, batch_axis: int, seq_axis: int) -> torch.Tensor:
    """Gather ``x`` with per-row indices ``idx (B, K)`` on ``seq_axis`` (batch on ``batch_axis``, of size
    B or 1)."""
    x = torch.movedim(x, (batch_axis, seq_axis), (0, 1))
    B, K = idx.shape
    x = x.expand(B, *x.shape[1:])
    view = [B, K] + [1] * (x.dim() - 2)
    out = torch.gather(x, 1, idx.reshape(view).expand(B, K, *x.shape[2:]))
    return torch.movedim(out, (0, 1), (batch_axis, seq_axis))


class DecoderSpec:
    """The base spec: transformers Llama / Qwen2 ``*ForCausalLM`` decoders, 1-D positions.

    Subclasses override what differs; the methods are grouped as the callers use them.
    """

    # ------------------------------------------------------------------ graph inputs
    # the prefill graph's inputs in order, and per input its (batch axis, sequence axis)
    PREFILL_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "spatial_mask")
    AXES = {"inputs_embeds": (0, 1), "attention_mask": (0, 1), "position_ids": (0, 1), "spatial_mask": (0, 1),
            "spatial_xyz": (0, 1), "decode_position_ids": (0, 1)}
    # where the pass finds layer i in a captured graph: the module path in ``nn_module_stack``
    LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
    # the ops whose first input is a layer's post-RoPE query (sdpa, or eager attention's QK^T matmul)
    ATTENTION_OPS = (
        torch.ops.aten.scaled_dot_product_attention.default,
        torch.ops.aten.matmul.default,
        torch.nn.functional.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
    )

    # the runtime's name for how this family's positions are built and continued
    # (:mod:`adatoken_compile.runtime.positions`), written into the artifact by compile
    POSITION_LAYOUT = "sequence"

    def position_layout(self) -> dict:
        """The artifact's ``preprocess.json`` ``positions``: the layout the runtime builds prefill and
        decode positions with (it must equal :meth:`positions` / :meth:`decode_positions`)."""
        return {"layout": self.POSITION_LAYOUT}

    def position_axes(self, name: str = "position_ids") -> tuple[int, int]:
        """(batch axis, sequence axis) of a prefill input."""
        return self.AXES[name]

    def prefill_dynamic_axes(self, names) -> tuple[dict[int, str], ...]:
        """Per input in ``names``: {axis: "batch" | "seq"} (the export's dynamic axes)."""
        out = []
        for n in names:
            b, s = self.position_axes(n)
            out.append({b: "batch", s: "seq"})
        return tuple(out)

    # ------------------------------------------------------------------ modules
    def body(self, lm: nn.Module) -> nn.Module:
        """The decoder body (embeddings, layers, norm, rotary) under the causal-LM head."""
        return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model

    def layers(self, lm: nn.Module):
        layers = getattr(self.body(lm), "layers", None)
        if layers is None:
            raise InputError(f"{type(lm).__name__}: no decoder layers found (expected model.layers); "
                             "this model family is not supported")
        return layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention_input(self, args, kwargs) -> torch.Tensor:
        """The attention module's input (after the layer's input norm) from its forward's arguments."""
        return kwargs.get("hidden_states", args[0] if args else None)

    def head(self, lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits from the last layer's hidden state (B, T, H) at the last position."""
        return lm.lm_head(self.body(lm).norm(hidden)[:, -1])

    # ------------------------------------------------------------------ positions and rotary
    def positions(self, inputs) -> torch.Tensor:
        """The ``position_ids`` the layers take, from a :class:`adatoken_compile.contract.DecoderInputs`
        (InputError when their shape is not this layout's)."""
        pos, want = inputs.position_ids, tuple(inputs.inputs_embeds.shape[:2])
        if tuple(pos.shape) != want:
            raise InputError(f"prefill: position_ids must be (B, L)={want}, got {tuple(pos.shape)}")
        return pos.to(torch.int64)

    def rotary(self, lm: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The layers' ``position_embeddings`` for ``position_ids``."""
        return self.body(lm).rotary_emb(hidden, position_ids=position_ids)

    def gather_positions(self, position_ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The kept tokens' ORIGINAL position ids at a cut (``idx (B, K)``: kept positions, padding first)."""
        return gather_rows(position_ids, idx, *self.position_axes("position_ids"))

    def gather_rotary(self, position_embeddings, idx: torch.Tensor):
        """The kept tokens' rotary tables at a cut (cos / sin with batch first, sequence second)."""
        return tuple(gather_rows(t, idx, 0, 1) for t in position_embeddings)

    def rotary_rows(self, position_embeddings, b: int, rows: torch.Tensor):
        """Row ``b``'s rotary tables at positions ``rows``: ((m, d) cos, (m, d) sin)."""
        out = []
        for t in position_embeddings:
            tb = t[b] if t.shape[0] > b else t[0]
            out.append(tb[rows])
        return tuple(out)

    def rope_function(self, attn: nn.Module):
        """The rotary application of ``attn``'s modeling module (``apply_rotary_pos_emb(q, k, cos, sin)``)."""
        mod = sys.modules.get(type(attn).__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None:
            raise InputError(f"{type(attn).__name__}: no apply_rotary_pos_emb in {type(attn).__module__}; "
                             "this attention class is not supported")
        return fn

    def query_rows(self, attn: nn.Module, h_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries for some rows of one sequence, recomputed from the attention input.

        ``h_norm`` (m, H) is the attention input at those rows, ``cos`` / ``sin`` their rotary tables
        (:meth:`rotary_rows`). Returns (heads, m, d) float32.
        """
        d = attn.head_dim
        q = attn.q_proj(h_norm).view(h_norm.shape[0], -1, d)  # (m, heads, d)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head q norm
            q = attn.q_norm(q)
        q = q.transpose(0, 1).unsqueeze(0)  # (1, heads, m, d)
        q, _ = self.rope_function(attn)(q, q, cos.unsqueeze(0), sin.unsqueeze(0))
        return q[0].float()

    # ------------------------------------------------------------------ running layers
    def causal_mask(self, lm: nn.Module, hidden, attention_mask, position_ids, cache, materialize: bool):
        """The layers' attention mask, built once as the model's own forward builds it (``materialize``:
        a 4-D mask even for an unpadded batch, which a cut gathers)."""
        return create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids, allow_is_causal_skip=not materialize)

    def run_layer(self, lm: nn.Module, i: int, hidden, *, mask, position_embeddings, position_ids, cache):
        """Decoder layer ``i`` on ``hidden`` (B, T, H) -> (B, T, H), its keys / values into ``cache``."""
        out = self.layers(lm)[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                 position_ids=position_ids, cache=cache, use_cache=True)
        return out[0] if isinstance(out, tuple) else out  # older transformers returned tuples

    # ------------------------------------------------------------------ the captured graph
    def layer_of_path(self, module_path: str) -> int | None:
        """The decoder layer a module path (``lm.model.layers.3.self_attn``) belongs to, or None."""
        m = self.LAYER_PATH.search(str(module_path))
        return int(m.group(1)) if m else None

    def is_attention_op(self, target) -> bool:
        return target in self.ATTENTION_OPS

    # ------------------------------------------------------------------ decode
    def decode_positions(self, inputs, steps: int = 0) -> torch.Tensor:
        """Position ids of the token decoded after ``steps`` others, from the prefill's
        :class:`adatoken_compile.contract.DecoderInputs`: (B, 1), each row's ORIGINAL (unpruned)
        prompt length plus ``steps``, whatever the cuts dropped."""
        return torch.as_tensor(inputs.lengths(), dtype=torch.int64)[:, None] + int(steps)

    def example_decode_positions(self, batch: int, position: int) -> torch.Tensor:
        """Decode-graph ``position_ids`` of ``batch`` rows all at ``position`` (the export example)."""
        return torch.full((batch, 1), int(position), dtype=torch.int64)


    # ------------------------------------------------------------------ ONNX Runtime fusions
    def ort_fusions(self, lm: nn.Module) -> dict | None:
        """The keywords of :func:`adatoken_compile.compiler.fusions.fuse_decoder` for this family's
        exported prefill and decode graphs (None: no fusions). The base family's RMSNorm and
        rotate-half RoPE match onnxruntime's fused ops; the rotary tables have
        ``max_position_embeddings`` rows (none in the config: rotary stays unfused)."""
        v = getattr(lm.config, "max_position_embeddings", None)
        return {"max_positions": int(v) if v else None}


BASE = DecoderSpec()
_SPECS: dict[str, DecoderSpec] = {"llama": BASE, "qwen2": BASE}


def register(model_type: str, spec: DecoderSpec) -> None:
    """Make ``spec`` the spec of decoders whose ``config.model_type`` is ``model_type``."""
    _SPECS[str(model_type)] = spec


def spec_for_type(model_type: str | None) -> DecoderSpec:
    """The registered spec of a ``model_type``; the base spec for any other transformers decoder
    (a Llama-like one runs; anything else fails where it differs, with a one-line error)."""
    return _SPECS.get(str(model_type), BASE)


def spec_for(lm: nn.Module) -> DecoderSpec:
    """The spec of an installed ``*ForCausalLM``."""
    return spec_for_type(getattr(getattr(lm, "config", None), "model_type", None))
