"""``compile``: an adapter + a schedule -> a self-contained ONNX Runtime artifact directory.

Steps: capture the decoder's prefill (torch.export), apply the token-drop pass, export every
graph through :func:`adatoken_compile.compiler.export.export` (the adapter's encoder graphs, the
pruned prefill, one decode step), then write the embeddings, tokenizer, preprocessing settings,
schedule and a manifest hashing every file (format: :mod:`adatoken_compile.artifact`). Everything
is written into a temporary directory beside the target and renamed into place at the end
(:func:`adatoken_compile.io.atomic_dir`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time

import numpy as np

from adatoken_compile.artifact import (EMBED_FILE, FORMAT, MANIFEST, PREPROCESS_FILE, SCHEDULE_FILE, TOKENIZER_DIR,
                                       VERSION, Manifest, file_digest, file_table, verify)
from adatoken_compile.compiler.capture import capture, export_prefill
from adatoken_compile.compiler.decode import export_decode
from adatoken_compile.compiler.export import export, graph_io
from adatoken_compile.compiler.weights import DTYPES, Quantization, torch_dtype
from adatoken_compile.environment import environment
from adatoken_compile.errors import InputError
from adatoken_compile.io import atomic_dir, check_output
from adatoken_compile.passes.graph_diff import diff_graphs, format_diff
from adatoken_compile.passes.token_drop import apply_token_drop

def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[compile] {msg}", file=sys.stderr, flush=True)


def example_batch(adapter):
    """The adapter's export example (two samples, different question lengths) as one padded batch."""
    return adapter.prepare(adapter.example_samples())


def reusable(reuse: str, adapter, precision: dict, opset: int | None) -> Manifest:
    """The verified manifest of ``reuse``, an artifact whose schedule-independent graphs (encoders,
    decode) this compile copies instead of exporting again; refused unless it was compiled from the
    same model, in the same precision and (when given) opset."""
    man = verify(reuse)
    if man.fingerprint != adapter.fingerprint() or man.data.get("precision") != precision:
        raise InputError(f"{reuse}: compiled from another model or in another precision than this compile; "
                         "pass an artifact of the same model and --dtype / --quantize, or drop --reuse")
    if opset is not None and any(g.get("opset") != opset for g in man.graphs.values()):
        raise InputError(f"{reuse}: its graphs are not opset {opset}; drop --reuse or --opset")
    return man


def _copy_graph(man: Manifest, name: str, tmp: str, progress: bool) -> dict:
    g = man.graphs[name]
    for rel in [g["file"], *g.get("external_data", [])]:
        shutil.copyfile(os.path.join(man.path, rel), os.path.join(tmp, rel))
    _log(progress, f"{g['file']} copied from {man.path}")
    return {k: g[k] for k in ("external_data", "quantized_matmuls") if k in g}


def _export_graphs(adapter, schedule, tmp: str, opset, progress: bool, decode: bool, quantize,
                   reuse: Manifest | None = None) -> dict:
    """Every ONNX graph of the artifact into ``tmp``; returns name -> extra manifest fields.
    The decoder's graphs read lazily loaded weights from disk and are quantised when asked.
    ``reuse``: an artifact whose encoder and decode graphs are copied rather than exported."""
    lazy = adapter.lazy_weights or None
    graphs = {}
    for g in adapter.encoder_graphs():
        if reuse is not None and g.name in reuse.graphs:
            graphs[g.name] = _copy_graph(reuse, g.name, tmp, progress)
            continue
        res = export(g.module, g.example_args, g.dynamic_shapes, os.path.join(tmp, f"{g.name}.onnx"), g.input_names,
                     g.output_names, opset=opset)
        graphs[g.name] = {"external_data": [res.external_data] if res.external_data else []}
        _log(progress, f"{g.name}.onnx exported ({res.export_s:.1f}s)")
    example = example_batch(adapter)
    t0 = time.perf_counter()
    pruned = apply_token_drop(capture(adapter.decoder, example), schedule)
    _log(progress, f"prefill captured + token-drop pass ({len(schedule.effective_cuts())} cuts, {time.perf_counter() - t0:.1f}s)")
    res = export_prefill(pruned, example, os.path.join(tmp, "prefill.onnx"), opset=opset, weights=lazy,
                         quantize=quantize)
    graphs["prefill"] = {"external_data": [res.external_data] if res.external_data else [],
                         "adatoken_nodes": res.adatoken_nodes, "topk_nodes": res.topk_nodes,
                         "quantized_matmuls": res.quantized_matmuls, "fused_attention": res.fused_attention}
    _log(progress, f"prefill.onnx exported ({res.export_s:.1f}s, {res.topk_nodes} TopK, "
         f"{res.fused_attention} GroupQueryAttention"
         + (f", {res.quantized_matmuls} MatMulNBits" if quantize else "") + ")")
    del pruned
    if decode and reuse is not None and "decode" in reuse.graphs:
        graphs["decode"] = _copy_graph(reuse, "decode", tmp, progress)
    elif decode:
        res = export_decode(adapter.decoder, os.path.join(tmp, "decode.onnx"), opset=opset, weights=lazy,
                            quantize=quantize)
        graphs["decode"] = {"external_data": [res.external_data] if res.external_data else [],
                            "quantized_matmuls": res.quantized_matmuls,
                            "kv": "concat" if "present_mask.0" in res.output_names else "buffers"}
        _log(progress, f"decode.onnx exported ({res.export_s:.1f}s)")
    else:
        _log(progress, "decode graph skipped: the artifact answers 1 token")
    return graphs


def precision_of(adapter, dtype: str | None, quantize) -> dict:
    """The artifact's precision record: the dtype the graphs compute in, the dtype they exchange
    with the caller (float32 for bfloat16, which numpy lacks) and the weight quantisation."""
    have = next(k for k, v in DTYPES.items() if v == adapter.dtype)
    if dtype is not None and torch_dtype(dtype) != adapter.dtype:
        raise InputError(f"compile --dtype {dtype}: the model was loaded in {have}; load it with dtype='{dtype}' "
                         "(or pass the checkpoint name or directory and let compile load it)")
    return {"dtype": have, "io_dtype": "float32" if have == "bfloat16" else have,
            "quantize": quantize.validate().to_dict() if quantize is not None else None}


def compile_artifact(adapter, schedule, out_dir: str, *, opset: int | None = None, progress: bool = True,
                     decode: bool = True, overwrite: bool = False, dtype: str | None = None,
                     quantize: Quantization | None = None, reuse: str | None = None) -> Manifest:
    """Compile ``adapter`` pruned by ``schedule`` into the artifact directory ``out_dir``.

    Refuses a schedule made for another model (:class:`~adatoken_compile.errors.ScheduleMismatch`)
    and an ``out_dir`` that exists and is not an earlier artifact (an earlier artifact only with
    ``overwrite``), both before any work. ``decode=False`` skips the decode graph (the artifact then
    answers one token). ``dtype``: the precision the graphs compute in, which is the adapter's (it
    is checked: load the model in it); ``quantize``: int4 weights for the decoder's linear layers.
    An adapter loaded with ``lazy=True`` has its decoder weights read from the checkpoint one at a
    time while the graphs are written. ``reuse``: an earlier artifact of the same model and
    precision whose encoder and decode graphs, which no schedule changes, are copied instead of
    exported (several schedules of one model compile faster). The returned manifest's ``digest``
    identifies the artifact.
    """
    layers = adapter.arch()["num_layers"]
    precision = precision_of(adapter, dtype, quantize)
    schedule.validate()
    schedule.check_model(adapter.fingerprint(), layers, family=adapter.family)
    check_output(out_dir, "artifact", overwrite=overwrite)
    lender = reusable(reuse, adapter, precision, opset) if reuse else None
    t_start = time.perf_counter()
    with atomic_dir(out_dir, "artifact", overwrite=overwrite) as tmp:
        _log(progress, f"compiling {adapter.family} ({layers} layers, {precision['dtype']}"
             + (f", int4 weights in blocks of {quantize.block_size}" if quantize else "") + ") with schedule "
             + (", ".join(f"L{c.layer}:{c.keep:.3g}" for c in schedule.cuts) or "identity") + f" -> {out_dir}")
        extra = _export_graphs(adapter, schedule, tmp, opset, progress, decode, quantize, lender)
        # the table the runtime embeds text with, in the dtype the prefill graph takes
        emb = adapter.decoder.get_input_embeddings().weight.detach().to(DTYPES[precision["io_dtype"]]).cpu().numpy()
        np.save(os.path.join(tmp, EMBED_FILE), np.ascontiguousarray(emb))
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        adapter.tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        with open(os.path.join(tmp, PREPROCESS_FILE), "w", encoding="utf-8") as f:
            # the runtime builds prefill and decode positions as the decoder's spec lays them out
            json.dump({**adapter.runtime_config(), "positions": adapter.spec.position_layout()}, f,
                      indent=2)
        schedule.save(os.path.join(tmp, SCHEDULE_FILE))
        files = file_table(tmp)
        graphs = {name: {"file": f"{name}.onnx", **graph_io(os.path.join(tmp, f"{name}.onnx")), **fields}
                  for name, fields in extra.items()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"fingerprint": adapter.fingerprint(), "family": adapter.family, "describe": adapter.describe()},
            "schedule": schedule.to_dict(),
            "precision": precision,
            "graphs": graphs,
            "tokenizer": TOKENIZER_DIR,
            "embed_tokens": EMBED_FILE,
            "preprocess": PREPROCESS_FILE,
            "schedule_file": SCHEDULE_FILE,
            **environment(),
            "compile_s": round(time.perf_counter() - t_start, 3),
            "files": files,
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        digest = file_digest(os.path.join(tmp, MANIFEST))
    _log(progress, f"done in {manifest['compile_s']:.1f}s; artifact digest {digest}")
    return Manifest(os.path.abspath(out_dir), manifest, digest)


def diff_text(adapter, schedule) -> str:
    """Human-readable graph diff of the token-drop pass (per cut: inserted nodes, rewired uses)."""
    schedule.validate()
    schedule.check_model(adapter.fingerprint(), adapter.arch()["num_layers"], family=adapter.family)
    gm = capture(adapter.decoder, example_batch(adapter))
    diffs = diff_graphs(gm, apply_token_drop(gm, schedule))
    if not diffs:
        return "no changes: the schedule drops no tokens (identity)"
    return format_diff(diffs)
