"""The weights of an exported graph: read when they are written, transposed, cast or quantised one
tensor at a time, so that compiling a model never holds more than a few of its weights in memory.

Every graph of :func:`adatoken_compile.compiler.export.export` passes through these steps on the
ONNX IR, before the graph optimizer runs and before saving:

* :func:`stream_initializers` -- initializers whose values live on disk (a checkpoint read shard by
  shard, :class:`WeightSource`) become :class:`onnx_ir.LazyTensor` s: the graph is traced on
  placeholder parameters and each real tensor is read, cast to the traced dtype and written into
  the external-data file when the model is saved (onnx_ir writes tensors one after another);
* :func:`fold_weight_transposes` -- ``Transpose(W)`` of a weight (every ``nn.Linear`` exports as
  ``MatMul(x, Transpose(W))``) becomes a lazily transposed initializer named ``<W>.T``, so the
  optimizer never materialises a transposed copy of every weight at once;
* :func:`quantize_matmuls` -- ``MatMul(x, W)`` (and ``Gemm(x, W, transB=1)``, the lm_head) with a
  constant 2-D ``W`` becomes onnxruntime's ``MatMulNBits``, quantised by onnxruntime's own
  MatMulNBits quantiser one weight at a time (the quantised blocks wait in a spill directory
  until the model is saved);
* :func:`float32_boundary` -- a bfloat16 graph takes and returns float32 at its inputs and outputs
  (ONNX Runtime's Python API cannot exchange bfloat16 arrays with numpy).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch

from adatoken_compile.errors import InputError

# the quantiser's module configures the root logger at INFO when imported (then every library's
# INFO lines print): undone right after, and its own per-node INFO lines are silenced
_root = logging.getLogger()
_root_state = (_root.level, list(_root.handlers))
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer  # noqa: E402

_root.setLevel(_root_state[0])
for _h in [h for h in _root.handlers if h not in _root_state[1]]:
    _root.removeHandler(_h)
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

WeightSource = Mapping[str, Callable[[], torch.Tensor]]
"""Initializer (parameter) name -> a function returning its value; called when the tensor is written."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZE = ("int4",)


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``float16`` / ``bfloat16`` -> the torch dtype (one-line error otherwise)."""
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: choose {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantisation of the decoder's linear layers (onnxruntime ``MatMulNBits``).

    ``block_size``: weights per quantisation block along the input axis (a power of two >= 16);
    ``symmetric``: no zero points; ``accuracy_level``: MatMulNBits' compute type on CPU (0: the
    activations' float type, 4: int8 activations, which the CPU kernels run fastest).
    """

    method: str = "int4"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4

    def validate(self) -> "Quantization":
        if self.method not in QUANTIZE:
            raise InputError(f"--quantize {self.method!r}: choose {', '.join(QUANTIZE)}")
        b = int(self.block_size)
        if b < 16 or b & (b - 1):
            raise InputError(f"--block-size {self.block_size}: a power of two >= 16, e.g. 32 or 128")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level {self.accuracy_level}: 0-4 (MatMulNBits)")
        return self

    def to_dict(self) -> dict:
        return {"method": self.method, "bits": 4, "block_size": int(self.block_size), "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "op": "com.microsoft.MatMulNBits",
                "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer"}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16, which numpy lacks)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_torch_dtype(dtype: ir.DataType) -> torch.dtype:
    return {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
            ir.DataType.BFLOAT16: torch.bfloat16}[dtype]


def stream_initializers(model: ir.Model, source: WeightSource | None) -> int:
    """Initializers named in ``source`` read their value from it when written (cast to the dtype
    they were traced in). Returns how many."""
    if not source:
        return 0
    n = 0
    for name, value in model.graph.initializers.items():
        load = source.get(name)
        if load is None:
            continue
        dtype, shape = value.dtype, value.shape

        def read(load=load, dtype=dtype, shape=shape, name=name):
            t = load()
            if tuple(t.shape) != tuple(shape):
                raise InputError(f"weight '{name}' has shape {tuple(t.shape)} on disk, the graph was traced with "
                                 f"{tuple(shape)}; the checkpoint changed while compiling?")
            return ir.Tensor(to_numpy(t.to(_from_torch_dtype(dtype))), name=name)

        value.const_value = ir.LazyTensor(read, dtype=dtype, shape=ir.Shape(shape), name=name)
        n += 1
    return n


def _transposed(g: ir.Graph, src: ir.Value, perm: list[int]) -> ir.Value:
    """A new initializer ``<src>.T``: ``src`` transposed by ``perm`` when it is written."""
    tensor, name = src.const_value, src.name + ".T"
    shape = ir.Shape([src.shape[p] for p in perm])

    def value():
        return ir.Tensor(np.ascontiguousarray(np.asarray(tensor.numpy()).transpose(perm)), name=name)

    new = ir.Value(name=name, shape=shape, type=ir.TensorType(src.dtype),
                   const_value=ir.LazyTensor(value, dtype=src.dtype, shape=shape, name=name))
    g.register_initializer(new)
    return new


def fold_weight_transposes(model: ir.Model) -> int:
    """``Transpose(W)`` with ``W`` an initializer used only there -> initializer ``<W>.T``, transposed
    when written. Returns how many."""
    g = model.graph
    n = 0
    for node in list(g):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src is None or not src.is_initializer() or src.const_value is None or len(src.uses()) != 1 \
                or out.is_graph_output():
            continue
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.value) if perm_attr is not None else list(range(len(src.shape)))[::-1]
        out.replace_all_uses_with(_transposed(g, src, perm))
        g.remove(node, safe=True)
        g.initializers.pop(src.name)
        n += 1
    return n


def gemm_as_matmul(g: ir.Graph, node: ir.Node) -> ir.Node | None:
    """``Gemm(A, W, transB=1)`` (no bias, alpha 1, transA 0) -> ``MatMul(A, W.T)`` with a lazily
    transposed initializer: the quantiser (MatMul only) takes the lm_head too, and in float
    onnxruntime's CPU MatMul computes a few rows' logits faster than its Gemm with transB."""
    a = {k: v.value for k, v in node.attributes.items()}
    w = node.inputs[1]
    if (len(node.inputs) > 2 and node.inputs[2] is not None) or a.get("transA", 0) or not a.get("transB", 0) \
            or a.get("alpha", 1.0) != 1.0 or w is None or not w.is_initializer() or w.const_value is None \
            or len(w.uses()) != 1:
        return None
    mm = ir.Node("", "MatMul", [node.inputs[0], _transposed(g, w, [1, 0])], name=(node.name or "gemm") + "/as_matmul",
                 metadata_props=dict(node.metadata_props))
    ir.convenience.replace_nodes_and_values(g, node, [node], [mm], node.outputs, mm.outputs)
    g.initializers.pop(w.name)
    return mm


class _Spilled:
    """A quantised tensor kept in a .npy file until the model is saved (then read back once)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self):
        return ir.Tensor(np.load(self.path, allow_pickle=False), name=os.path.basename(self.path)[:-4])


def quantize_matmuls(model: ir.Model, q: Quantization, spill_dir: str) -> int:
    """Replace every ``MatMul`` with a constant 2-D weight (and the lm_head's ``Gemm``) by
    ``com.microsoft.MatMulNBits``. Each weight is quantised by onnxruntime's
    ``DefaultWeightOnlyQuantizer`` on a one-node graph holding only that weight; the quantised
    tensors are spilled to ``spill_dir`` and read back when the model is saved. Returns how many."""
    q.validate()
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=int(q.block_size), is_symmetric=bool(q.symmetric), accuracy_level=int(q.accuracy_level), bits=4))
    g = model.graph
    n = 0
    for node in list(g):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.op_type == "Gemm":
            node = gemm_as_matmul(g, node)
            if node is None:
                continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.shape) != 2 or len(w.uses()) != 1:
            continue
        if w.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        if int(w.shape[0]) < q.block_size:
            continue
        arr = np.asarray(w.const_value.numpy())
        proto = onnx.helper.make_node("MatMul", ["A", w.name], ["Y"], name=node.name or w.name)
        small = onnx.helper.make_graph([proto], "weight", [], [], initializer=[ir.serde.serialize_tensor(ir.Tensor(arr, name=w.name))])
        del arr
        new_nodes = quantizer.quantize(proto, [small])
        if len(new_nodes) != 1 or new_nodes[0].op_type != "MatMulNBits":
            continue
        qn = new_nodes[0]
        values = {}
        for t in small.initializer:
            if t.name == w.name:
                continue
            arr = ir.serde.deserialize_tensor(t).numpy()
            path = os.path.join(spill_dir, f"{len(os.listdir(spill_dir)):06d}.npy")
            np.save(path, arr)
            dt = ir.DataType.from_numpy(arr.dtype)
            values[t.name] = ir.Value(name=t.name, shape=ir.Shape(arr.shape), type=ir.TensorType(dt),
                                      const_value=ir.LazyTensor(_Spilled(path), dtype=dt, shape=ir.Shape(arr.shape),
                                                                name=t.name))
            del arr
        del small
        inputs = [node.inputs[0]] + [values[name] for name in list(qn.input)[1:]]
        for v in values.values():
            g.register_initializer(v)
        attrs = [ir.Attr(a.name, ir.AttributeType.INT, int(a.i)) for a in qn.attribute]
        new = ir.Node("com.microsoft", "MatMulNBits", inputs, attrs, name=(node.name or w.name) + "/int4",
                      metadata_props=dict(node.metadata_props))
        ir.convenience.replace_nodes_and_values(g, node, [node], [new], node.outputs, new.outputs)
        g.initializers.pop(w.name)
        n += 1
    if n:
        model.opset_imports["com.microsoft"] = 1
    return n


def float32_boundary(model: ir.Model, inner: ir.DataType = ir.DataType.BFLOAT16) -> int:
    """Graph inputs and outputs of dtype ``inner`` become float32, cast at the boundary inside the
    graph. Returns how many were changed."""
    g = model.graph
    n = 0
    for i, v in enumerate(list(g.inputs)):
        if v.dtype != inner:
            continue
        outer = ir.Value(name=v.name, shape=v.shape, type=ir.TensorType(ir.DataType.FLOAT))
        v.name = v.name + "/" + inner.name.lower()
        cast = ir.Node("", "Cast", [outer], [ir.Attr("to", ir.AttributeType.INT, int(inner))], outputs=[v],
                       name=f"boundary/{outer.name}")
        g.inputs[i] = outer
        g.insert_before(next(iter(g)), cast)
        n += 1
    for i, v in enumerate(list(g.outputs)):
        if v.dtype != inner:
            continue
        name = v.name
        v.name = name + "/" + inner.name.lower()
        outer = ir.Value(name=name, shape=v.shape, type=ir.TensorType(ir.DataType.FLOAT))
        g.append(ir.Node("", "Cast", [v], [ir.Attr("to", ir.AttributeType.INT, int(ir.DataType.FLOAT))],
                         outputs=[outer], name=f"boundary/{name}"))
        g.outputs[i] = outer
        n += 1
    return n
