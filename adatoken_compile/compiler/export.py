"""Export a (pruned) prefill GraphModule to ONNX and run it with ONNX Runtime.

Path: ``torch.export.export(gm, strict=False, dynamic batch/seq)`` -> ``torch.onnx.export(ep,
dynamo=True)`` (torchlib translation + onnxscript optimizer) -> post-processing on the ONNX IR:

* nodes traced from a token-drop step (``pkg.torch.onnx.name_scopes`` contains the step module
  ``adatoken_cut{c}_<role>``) are renamed ``adatoken_cut{c}_<role>/<original name>`` so they are
  identifiable in the ONNX graph (the scope also stays in the node's metadata_props);
* every ``TopK`` gets ``sorted=1`` (ORT's CUDA TopK wants it; the exporter already emits it);
* weights above ``external_data_threshold`` bytes go to ``<name>.onnx.data`` next to the model;
* ``onnx.checker.check_model`` runs on the saved file; model and data are written to a temporary
  directory and renamed into place, so a failed export leaves nothing behind.

The pruned graph's new sequence length K' is data-dependent: torch.export sees an unbacked SymInt,
ONNX gets a dynamic dim fed by ``TopK``'s ``K`` input, so one file serves any batch / scene size.
"""

from __future__ import annotations

import logging

import ast
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adatoken_compile.compiler.capture import INPUT_NAMES, dynamic_shapes, example_args
from adatoken_compile.contract import DecoderInputs


class _NoTorchvisionNoise(logging.Filter):
    """torch.onnx warns once per op that torchvision is absent; it is never needed here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvisionNoise())


def save_model_atomic(model, path: str, external_data_threshold: int, check: bool = True) -> tuple[bool, str]:
    """Save an ONNX IR model (weights over the threshold as ``<name>.data`` next to it) through a temp
    dir, checker first, then rename into place. Returns (whether external data was written, its name)."""
    import onnx
    import onnx_ir as ir

    final_dir = os.path.dirname(path)
    os.makedirs(final_dir, exist_ok=True)
    base = os.path.basename(path)
    data_name = base + ".data"
    tmp = tempfile.mkdtemp(prefix=".onnx-export-", dir=final_dir)
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
    return has_data, data_name


@dataclass
class OnnxExport:
    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    export_s: float
    external_data: str | None
    topk_nodes: int
    topk_sorted_fixed: int
    adatoken_nodes: dict[str, int] = field(default_factory=dict)  # step scope -> ONNX node count

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


def _postprocess(model) -> tuple[int, int, dict[str, int]]:
    import onnx_ir as ir

    topk = fixed = 0
    counts: dict[str, int] = {}
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


def export_onnx(
    gm: torch.nn.Module,
    example: DecoderInputs,
    path: str,
    *,
    external_data_threshold: int = 1024,
    optimize: bool = True,
    opset_version: int | None = None,
    check: bool = True,
) -> OnnxExport:
    """Export ``gm`` (a captured or pruned prefill) to ``path`` (.onnx) with dynamic batch / seq."""
    layout = getattr(gm, "meta", {}).get("adatoken_layout", {})
    in_names = list(layout.get("inputs", INPUT_NAMES))
    out_names = list(layout.get("outputs", [])) or None
    args = example_args(example)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes(), strict=False)
        kw = {} if opset_version is None else {"opset_version": opset_version}
        prog = torch.onnx.export(
            ep,
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            optimize=optimize,
            verbose=False,
            **kw,
        )
    model = prog.model
    topk, fixed, counts = _postprocess(model)
    opset = int(model.opset_imports.get("", 0))

    path = os.path.abspath(path)
    has_data, data_name = save_model_atomic(model, path, external_data_threshold, check)
    return OnnxExport(
        path=path,
        opset=opset,
        input_names=in_names,
        output_names=[v.name for v in model.graph.outputs],
        export_s=time.perf_counter() - t0,
        external_data=data_name if has_data else None,
        topk_nodes=topk,
        topk_sorted_fixed=fixed,
        adatoken_nodes=counts,
    )


def ort_session(path: str, providers: list[str] | None = None, level: str = "all"):
    """ONNX Runtime session; ``level`` all|extended|basic|disable (default ORT_ENABLE_ALL)."""
    from adatoken_compile.runtime.engine import make_session

    return make_session(path, providers or ("CPUExecutionProvider",), level=level)


def ort_feeds(inputs: DecoderInputs) -> dict[str, np.ndarray]:
    return {
        "inputs_embeds": inputs.inputs_embeds.detach().cpu().numpy(),
        "attention_mask": inputs.attention_mask.to(torch.int64).cpu().numpy(),
        "position_ids": inputs.position_ids.to(torch.int64).cpu().numpy(),
        "spatial_mask": inputs.spatial_mask.to(torch.bool).cpu().numpy(),
    }


def run_ort(session, inputs: DecoderInputs) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    feeds = ort_feeds(inputs)
    wanted = {i.name for i in session.get_inputs()}
    out = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, out))


def max_abs_diff_valid(outputs_a: dict, outputs_b: dict, num_layers: int) -> dict[str, float]:
    """Max |a-b| of logits and of every layer's keys/values on that layer's VALID positions
    (padding slots of a pruned layout hold don't-care values). Inputs: name -> array."""
    res = {"logits": float(np.abs(np.asarray(outputs_a["logits"], np.float64) - np.asarray(outputs_b["logits"])).max())}
    kv = 0.0
    for i in range(num_layers):
        m = np.asarray(outputs_a[f"mask.{i}"], bool)
        for kind in ("key", "value"):
            a, b = np.asarray(outputs_a[f"{kind}.{i}"], np.float64), np.asarray(outputs_b[f"{kind}.{i}"])
            d = np.abs(a - b).max(axis=(1, 3))
            if m.any():
                kv = max(kv, float(d[m].max()))
    res["kv_valid"] = kv
    return res
