"""Parity of a compiled prefill with its PyTorch reference: run the ONNX graph on a batch and
compare logits and every layer's cache on the positions that layer keeps."""

from __future__ import annotations

import numpy as np

from adatoken_compile.contract import DecoderInputs
from adatoken_compile.runtime.session import make_session


def ort_session(path: str, providers: list[str] | None = None, level: str = "all"):
    """ONNX Runtime session; ``level`` all|extended|basic|disable (default ORT_ENABLE_ALL)."""
    return make_session(path, providers or ("CPUExecutionProvider",), level=level)


def run_prefill(session, inputs: DecoderInputs) -> dict[str, np.ndarray]:
    """Outputs of a prefill graph on ``inputs``, by name."""
    names = [o.name for o in session.get_outputs()]
    feeds = inputs.to_numpy()
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))


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
