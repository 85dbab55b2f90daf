"""Parity of a compiled prefill with its PyTorch reference: run the ONNX graph on a batch and
compare logits and every layer's cache on the positions that layer keeps."""

from __future__ import annotations

import numpy as np

from adatoken_compile.contract import DecoderInputs
from adatoken_compile.runtime import load
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


def compare_artifacts(candidate: str, reference: str, samples, batch_size: int = 8, providers=None) -> dict:
    """A candidate artifact (another precision of the same model and schedule) against a reference
    one on the same questions, each through its own encoder and prefill (ONNX Runtime).

    Returns ``n``, the next-token logits' ``logits_max_abs`` / ``logits_mean_abs`` difference
    (float32), ``next_token_agreement`` (same greedy first token), and per cut ``kept_equal`` (the
    fraction of rows whose kept token positions are identical) and ``kept_overlap`` (the mean
    fraction of the reference's kept positions the candidate keeps too).
    """
    cand, ref = load(candidate, providers), load(reference, providers)
    if cand.manifest.fingerprint != ref.manifest.fingerprint or cand.schedule.to_dict() != ref.schedule.to_dict():
        raise ValueError(f"{candidate} and {reference}: compiled from different models or schedules")
    n = agree = 0
    max_abs = sum_abs = 0.0
    kept = [0] * len(ref.cuts)
    overlap = [0.0] * len(ref.cuts)
    for i in range(0, len(samples), batch_size):
        group = samples[i:i + batch_size]
        oc, orf = cand.prefill(cand.prepare(group)), ref.prefill(ref.prepare(group))
        lc, lr = oc["logits"].astype(np.float32), orf["logits"].astype(np.float32)
        d = np.abs(lc - lr)
        max_abs, sum_abs = max(max_abs, float(d.max())), sum_abs + float(d.mean(axis=1).sum())
        agree += int((lc.argmax(-1) == lr.argmax(-1)).sum())
        for c in range(len(kept)):
            for x, y in zip(oc[f"kept.{c}"], orf[f"kept.{c}"]):
                x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
                kept[c] += x == y
                overlap[c] += len(x & y) / max(len(y), 1)
        n += len(group)
    return {"n": n, "candidate": candidate, "reference": reference, "precision": cand.precision,
            "logits_max_abs": max_abs, "logits_mean_abs": sum_abs / max(n, 1),
            "next_token_agreement": agree / max(n, 1), "kept_equal": [k / max(n, 1) for k in kept],
            "kept_overlap": [o / max(n, 1) for o in overlap]}
