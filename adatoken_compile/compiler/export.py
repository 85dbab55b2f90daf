"""The one path from a PyTorch module to an ONNX file: torch.export (non-strict) ->
torch.onnx (dynamo: torchlib translation + onnxscript optimizer) -> post-processing on the
ONNX IR -> saved beside its external data, checked, renamed into place.

Every graph of an artifact (encoders, prefill, decode) goes through :func:`export`.
Post-processing, for every graph:

* nodes traced from a token-drop step (``pkg.torch.onnx.name_scopes`` contains the step module
  ``adatoken_cut{c}_<role>``) are renamed ``adatoken_cut{c}_<role>/<original name>`` so they are
  identifiable in the ONNX graph and in ORT profiles (the scope also stays in metadata_props);
* every ``TopK`` gets ``sorted=1`` (ORT's CUDA TopK wants it; the exporter already emits it);
* the node metadata that records where the traced Python code lives (``pkg.torch.onnx.stack_trace``:
  file paths and line numbers; ``namespace`` / ``pkg.torch.onnx.class_hierarchy``: the classes'
  import names) is dropped, so the same graph is the same bytes (and sha256) from any checkout,
  whatever lines moved in the traced code; the module scopes (``name_scopes``) and FX node text stay;
* an optional graph-specific step (e.g. naming the decode graph's symbolic dims);
* the weights (:mod:`adatoken_compile.compiler.weights`): read from disk when written (``weights``),
  transposed lazily, optionally quantised to int4 (``quantize``), a bfloat16 graph given float32
  inputs and outputs;
* weights above ``external_data_threshold`` bytes go to ``<name>.onnx.data`` next to the model,
  written one tensor at a time.

Precision: the graph computes in the dtype the module was traced in (load the model in float16 /
bfloat16 to export half precision); the inserted token-drop nodes score and softmax in float32
(:func:`adatoken_compile.passes.token_drop.ops.last_token_scores`).

The pruned prefill's new sequence length K' is data-dependent: torch.export sees an unbacked
SymInt, ONNX gets a dynamic dim fed by ``TopK``'s ``K`` input, so one file serves any batch and
scene size.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import onnx
import onnx_ir as ir
import torch

from adatoken_compile.compiler.attention import ONNX_TRANSLATIONS
from adatoken_compile.compiler.fusions import fuse_decoder
from adatoken_compile.compiler.weights import (Quantization, float32_boundary, fold_weight_transposes,
                                               quantize_matmuls, stream_initializers)


class _NoTorchvisionNoise(logging.Filter):
    """torch.onnx warns once per op that torchvision is absent; it is never needed here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvisionNoise())


@dataclass
class ExportResult:
    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    export_s: float
    external_data: str | None
    topk_nodes: int
    topk_sorted_fixed: int
    adatoken_nodes: dict[str, int] = field(default_factory=dict)  # step scope -> ONNX node count
    streamed_weights: int = 0  # initializers read from disk when written
    quantized_matmuls: int = 0  # MatMul / Gemm weights turned into MatMulNBits
    fused_attention: int = 0  # attention ops exported as one GroupQueryAttention node
    fused_ops: dict[str, int] = field(default_factory=dict)  # onnxruntime ops put in by compiler.fusions

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _scope_of(node) -> str | None:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    for s in scopes:
        if isinstance(s, str) and s.startswith("adatoken_cut"):
            return s
    return None


# node metadata that depends on where the traced source lives, not on the graph
SOURCE_METADATA = ("pkg.torch.onnx.stack_trace", "namespace", "pkg.torch.onnx.class_hierarchy")


def strip_source_metadata(model) -> int:
    """Drop :data:`SOURCE_METADATA` from every node of ``model`` (its graph, subgraphs and
    functions); returns how many entries went."""
    n = 0
    graphs = [model.graph, *model.functions.values()]
    for g in graphs:
        for node in ir.traversal.RecursiveGraphIterator(g):
            for key in SOURCE_METADATA:
                if node.metadata_props.pop(key, None) is not None:
                    n += 1
    return n


def _postprocess(model) -> tuple[int, int, dict[str, int]]:
    topk = fixed = 0
    counts: dict[str, int] = {}
    strip_source_metadata(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "TopK" and node.domain in ("", "ai.onnx"):
            topk += 1
            attr = node.attributes.get("sorted")
            if attr is None or attr.value != 1:
                node.attributes["sorted"] = ir.Attr("sorted", ir.AttributeType.INT, 1)
                fixed += 1
        scope = _scope_of(node)
        if scope is not None:
            counts[scope] = counts.get(scope, 0) + 1
            name = node.name or node.op_type
            if not name.startswith(scope):
                node.name = f"{scope}/{name[5:] if name.startswith('node_') else name}"
    return topk, fixed, counts


def _rename(values, names: Sequence[str]) -> None:
    """Name graph inputs / outputs by position (after the optimizer, which may rename outputs it
    merged); through temporary names, since the new names may be taken by other positions."""
    values = list(values)
    if len(names) != len(values) or len(set(names)) != len(names):
        raise RuntimeError(f"export: {len(values)} graph values, names {list(names)}")
    for i, v in enumerate(values):
        v.name = f"__adatoken_io_{i}"
    for v, name in zip(values, names):
        v.name = name


def save_model(model, path: str, external_data_threshold: int, check: bool = True, tmp: str | None = None) -> str | None:
    """Save an ONNX IR model (weights over the threshold in ``<name>.data`` next to it) through a
    temporary directory beside it (``tmp``, else a new one), checker first, then rename into place.
    Returns the data file's name, or None when every weight stayed inline."""
    final_dir = os.path.dirname(path)
    os.makedirs(final_dir, exist_ok=True)
    base = os.path.basename(path)
    data_name = base + ".data"
    tmp = tmp or tempfile.mkdtemp(prefix=".onnx-export-", dir=final_dir)
    try:
        tmp_path = os.path.join(tmp, base)
        ir.save(model, tmp_path, external_data=data_name, size_threshold_bytes=external_data_threshold)
        if check:
            onnx.checker.check_model(tmp_path, full_check=False)
        has_data = os.path.exists(os.path.join(tmp, data_name))
        if has_data:
            os.replace(os.path.join(tmp, data_name), os.path.join(final_dir, data_name))
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_name if has_data else None


def export(module: torch.nn.Module, args: Sequence[torch.Tensor], dynamic_shapes, path: str,
           input_names: Sequence[str], output_names: Sequence[str] | None = None, *, opset: int | None = None,
           external_data_threshold: int = 1024, optimize: bool = True, check: bool = True,
           postprocess: Callable | None = None, weights=None,
           quantize: Quantization | None = None, translations: dict | None = None,
           fusions: dict | None = None) -> ExportResult:
    """Export ``module`` called on ``args`` to ``path`` (.onnx, weights in ``path.data``).

    ``dynamic_shapes`` as torch.export takes them; ``postprocess(model)`` may edit the ONNX IR
    model before it is saved (after the common steps in the module docstring). ``weights``: the
    module's parameters whose values stay on disk until written
    (:class:`adatoken_compile.models.checkpoint.LazyWeights` of a model loaded lazily);
    ``quantize``: int4 weight-only quantisation of the constant-weight MatMul / Gemm nodes;
    ``translations``: ONNX translations of custom torch ops (``{op overload: onnxscript function}``);
    ``fusions``: a decoder graph's onnxruntime fusions, the keywords of
    :func:`adatoken_compile.compiler.fusions.fuse_decoder` (with ``optimize`` only: they match
    the optimised graph).
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
        kw = {} if opset is None else {"opset_version": opset}
        # the prefill's fused attention and any caller's custom ops (the decode step's) in one table
        kw["custom_translation_table"] = {**ONNX_TRANSLATIONS, **dict(translations or {})}
        # optimised here, after the weight passes: the optimizer would fold every weight's transpose in memory
        prog = torch.onnx.export(ep, tuple(args), dynamo=True, optimize=False, verbose=False, **kw)
    streamed = stream_initializers(prog.model, weights.for_module(module) if weights else None)
    fold_weight_transposes(prog.model)
    fused = {}
    if optimize:
        prog.optimize()
        if fusions is not None:
            fused = fuse_decoder(prog.model, **fusions)
    model = prog.model
    _rename(model.graph.inputs, input_names)
    if output_names:
        _rename(model.graph.outputs, output_names)
    topk, fixed, counts = _postprocess(model)
    if postprocess is not None:
        postprocess(model)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".onnx-export-", dir=os.path.dirname(path))
    try:  # the quantised weights wait in tmp until the model is written there
        nq = quantize_matmuls(model, quantize, tmp) if quantize is not None else 0
        float32_boundary(model)
        data = save_model(model, path, external_data_threshold, check, tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        path=path,
        opset=int(model.opset_imports.get("", 0)),
        input_names=[v.name for v in model.graph.inputs],
        output_names=[v.name for v in model.graph.outputs],
        export_s=time.perf_counter() - t0,
        external_data=data,
        topk_nodes=topk,
        topk_sorted_fixed=fixed,
        adatoken_nodes=counts,
        streamed_weights=streamed,
        quantized_matmuls=nq,
        fused_ops=fused,
    )


def graph_io(path: str) -> dict:
    """Inputs/outputs of an ONNX file: name, dtype, shape (ints or symbolic dim names), opset."""
    m = onnx.load(path, load_external_data=False)

    def vi(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    opset = next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": [vi(v) for v in m.graph.input], "outputs": [vi(v) for v in m.graph.output], "opset": opset}
