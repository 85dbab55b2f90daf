"""Capture the prefill of an installed transformers decoder as a torch.export graph.

:class:`PrefillModule` wraps the installed ``*ForCausalLM`` (unpatched) and fixes one calling
convention for the whole compiler::

    forward(inputs_embeds (B,L,H), attention_mask (B,L) int64, position_ids (B,L) int64,
            spatial_mask (B,L) bool)
      -> (logits_last (B,V),
          key_0 .. key_{n-1}     (B, kv_heads, L_i, head_dim)  post-RoPE, as the KV cache holds them,
          value_0 .. value_{n-1} (B, kv_heads, L_i, head_dim),
          mask_0 .. mask_{n-1}   (B, L_i) bool, valid (non-padding) positions of layer i's cache)

The per-layer keys/values are recorded by :class:`RecordingCache`, a duck-typed object passed as
``cache``: transformers attention calls ``cache.update(k, v, layer_idx)``
and uses what it returns, so no modeling code is patched. Unpruned, every ``L_i == L``; after the
token-drop pass the layers behind a cut hold fewer positions.

:func:`capture` runs ``torch.export.export(strict=False)`` with dynamic batch and sequence axes and
returns the unlifted :class:`torch.fx.GraphModule` (plain calling convention, weights as
``get_attr``), with the I/O layout in ``gm.meta["adatoken_layout"]``.

What the captured graph looks like (transformers 5.x, Llama / Qwen2, recorded by hand):

* the 4-D mask is built once before the layer loop by ``create_causal_mask``: ``sdpa`` gives a
  ``bool`` ``(B,1,L,L)`` mask (True = attend; padding rows are all False), ``eager`` gives a float
  additive ``(B,1,L,L)`` mask (0 / finfo.min). Under export the mask is always materialised.
* RoPE ``cos``/``sin`` ``(B,L,head_dim)`` are computed once (inside a ``wrap_with_set_grad_enabled``
  higher-order op) and read by every layer.
* values that cross a layer boundary: the hidden state ``(B,L,H)`` (the last residual add of the
  layer), the 4-D mask, ``cos``, ``sin``, and the SymInt ``L`` (``sym_size`` of an input) used by
  every ``view``/``reshape`` of the attention. ``position_ids`` is passed to the layers but unused
  by Llama/Qwen2 attention.
* ``node.meta["nn_module_stack"]`` names the owning module path (``lm.model.layers.3.self_attn``),
  which is how the pass assigns nodes to layers.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from adatoken_compile.arch import from_config
from adatoken_compile.compiler.attention import fused_copy
from adatoken_compile.compiler.export import ExportResult, export
from adatoken_compile.contract import DecoderInputs
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import DecoderSpec, spec_for, spec_for_type

INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids", "spatial_mask")
ATTENTION_MODES = ("fused", "decomposed")

# torch.export's pytree emits this FutureWarning once per exported module (torch 2.13 internals)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)


def output_names(num_layers: int) -> list[str]:
    return (
        ["logits"]
        + [f"key.{i}" for i in range(num_layers)]
        + [f"value.{i}" for i in range(num_layers)]
        + [f"mask.{i}" for i in range(num_layers)]
    )


class RecordingCache:
    """Duck-typed ``cache`` for one prefill: records each layer's (k, v) and returns them.

    Provides only what transformers 5 Llama/Qwen2 read from a cache during a prefill with no
    history (``update``, ``get_seq_length``, ``get_query_offset``, ``get_mask_sizes``).
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = key_states
        self.values[layer_idx] = value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int | None = None) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx=None):
        return query_length, 0


def check_decoder(decoder_lm: nn.Module) -> None:
    """Raise InputError for decoders this compiler does not handle."""
    cfg = getattr(decoder_lm, "config", None)
    if cfg is None or not hasattr(decoder_lm, "model") or not hasattr(decoder_lm, "lm_head"):
        raise InputError("decoder: expected a transformers *ForCausalLM with .model, .lm_head and .config")
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise InputError(
            f"decoder: attn_implementation '{impl}' cannot be exported; load it with attn_implementation='sdpa' or 'eager'"
        )
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise InputError("decoder: sliding-window / hybrid attention layers are not supported (use_sliding_window=False)")


class PrefillModule(nn.Module):
    """The prefill of ``decoder_lm`` with per-layer KV outputs (see module docstring)."""

    def __init__(self, decoder_lm: nn.Module):
        super().__init__()
        check_decoder(decoder_lm)
        self.lm = decoder_lm
        self.num_layers = int(decoder_lm.config.num_hidden_layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, spatial_mask):
        cache = RecordingCache(self.num_layers)
        out = self.lm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        logits = self.lm.lm_head(out.last_hidden_state[:, -1])
        valid = attention_mask.bool()
        return (logits, *cache.keys, *cache.values, *([valid] * self.num_layers))


def describe_decoder(decoder_lm: nn.Module) -> dict:
    """The normalized architecture (:mod:`adatoken_compile.arch`) plus the attention implementation
    and model type of an installed decoder."""
    cfg = decoder_lm.config
    return {**from_config(cfg), "attn_implementation": cfg._attn_implementation,
            "model_type": getattr(cfg, "model_type", None)}


def example_args(example: DecoderInputs, names=INPUT_NAMES, spec: DecoderSpec | None = None) -> tuple[torch.Tensor, ...]:
    """The graph inputs ``names`` (the four of :data:`INPUT_NAMES`, plus ``spatial_xyz`` when a cut's
    rule reads coordinates), positions in the family's layout (``spec``, default the base one); a
    batch of 1 is repeated to 2 (torch.export specialises size-1 axes)."""
    spec = spec or spec_for_type(None)
    feeds = {
        "inputs_embeds": example.inputs_embeds,
        "attention_mask": example.attention_mask.to(torch.int64),
        "position_ids": spec.positions(example),
        "spatial_mask": example.spatial_mask.to(torch.bool),
        "spatial_xyz": example.xyz(),
    }
    args = tuple(feeds[n] for n in names)
    if example.batch_size == 1:
        args = tuple(torch.cat([a, a], dim=spec.position_axes(n)[0]) for a, n in zip(args, names))
    return args


def dynamic_shapes(max_batch: int = 1024, max_seq: int = 1 << 17, n_inputs: int = len(INPUT_NAMES), axes=None):
    """torch.export dynamic shapes of the prefill inputs; ``axes``: per input {axis: "batch" | "seq"}
    (:meth:`adatoken_compile.models.spec.DecoderSpec.prefill_dynamic_axes`), default batch first."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    dims = {"batch": batch, "seq": seq}
    axes = axes or tuple({0: "batch", 1: "seq"} for _ in range(n_inputs))
    return tuple({a: dims[k] for a, k in ax.items()} for ax in axes)


def _check_example(example: DecoderInputs) -> None:
    if example.seq_len < 2:
        raise InputError("capture: the example batch needs a sequence of at least 2 tokens")
    if example.seq_len == max(2, example.batch_size):
        raise InputError("capture: use an example whose batch size differs from its sequence length "
                         "(torch.export would tie the two dynamic axes)")


def export_prefill(gm: nn.Module, example: DecoderInputs, path: str, *, opset: int | None = None,
                   external_data_threshold: int = 1024, optimize: bool = True, check: bool = True, weights=None,
                   quantize=None, attention: str = "fused") -> ExportResult:
    """ONNX export of a captured (or pruned) prefill with dynamic batch and sequence axes
    (``weights`` / ``quantize``: see :func:`adatoken_compile.compiler.export.export`).
    ``attention``: "fused" exports each layer's attention as one ``GroupQueryAttention`` node
    where :mod:`adatoken_compile.compiler.attention` applies, "decomposed" as the exporter's
    MatMul / Softmax lowering of sdpa; ``gm`` itself is not modified."""
    if attention not in ATTENTION_MODES:
        raise InputError(f"export: attention '{attention}' is not one of {', '.join(ATTENTION_MODES)}")
    layout = getattr(gm, "meta", {}).get("adatoken_layout", {})
    names = list(layout.get("inputs", INPUT_NAMES))
    spec = spec_for_type(layout.get("model_type"))
    fused = 0
    if attention == "fused" and isinstance(gm, torch.fx.GraphModule):
        gm, fused = fused_copy(gm)
    res = export(gm, example_args(example, names, spec), dynamic_shapes(axes=spec.prefill_dynamic_axes(names)), path,
                 names, list(layout.get("outputs", [])) or None, opset=opset, external_data_threshold=external_data_threshold,
                 optimize=optimize, check=check, weights=weights, quantize=quantize,
                 fusions=layout.get("ort_fusions"))
    res.fused_attention = fused
    return res


def plain_codegen(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Switch an unlifted module to the plain calling convention (positional inputs, flat tuple out)."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


def capture(decoder_lm: nn.Module, example: DecoderInputs) -> torch.fx.GraphModule:
    """Export the prefill of ``decoder_lm`` to an FX GraphModule with dynamic batch and sequence.

    The example should have batch >= 2 and seq != batch (torch.export specialises sizes 1 and may
    unify equal sizes). ``gm.meta["adatoken_layout"]`` records input/output names and the model
    summary; ``gm.meta["adatoken_capture_s"]`` the export time.
    """
    _check_example(example)
    decoder_lm.eval()
    mod = PrefillModule(decoder_lm).eval()
    spec = spec_for(decoder_lm)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(mod, example_args(example, spec=spec),
                                 dynamic_shapes=dynamic_shapes(axes=spec.prefill_dynamic_axes(INPUT_NAMES)), strict=False)
    gm = plain_codegen(ep.module())
    gm.meta["adatoken_layout"] = {
        "inputs": list(INPUT_NAMES),
        "outputs": output_names(mod.num_layers),
        **describe_decoder(decoder_lm),
        "ort_fusions": spec.ort_fusions(decoder_lm),
    }
    gm.meta["adatoken_capture_s"] = time.perf_counter() - t0
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if names != list(INPUT_NAMES):
        raise RuntimeError(f"capture: unexpected placeholders {names}")
    return gm
