"""Compile an adapter + schedule into a self-contained ONNX Runtime artifact directory.

Layout of ``ART/`` (every file hashed in ``manifest.json``)::

    manifest.json            format "adatoken-compile/artifact" v1: graphs + I/O, schedule, model,
                             library versions, sha256 + size of every other file, created_at
    encoder.onnx[.data]      LLaVA-3D: pixel_values (V,3,S,S), xyz (V,P,3) -> features (V,P,Dv)
                             HF LLaVA: pixel_values (B,3,S,S) -> features (B,P,H)
    projector.onnx[.data]    LLaVA-3D only: features (N,Dv) -> tokens (N,H)
    prefill.onnx[.data]      capture -> token-drop pass -> ONNX (inputs_embeds, attention_mask,
                             position_ids, spatial_mask -> logits, key/value/mask.{i}, kept.{c})
    decode.onnx[.data]       one decode step with per-layer caches (when adatoken_compile.compiler.decode exists)
    embed_tokens.npy         (vocab, H) float32 input embeddings (text ids are embedded in numpy)
    tokenizer/               tokenizer.json + tokenizer_config.json
    preprocess.json          image / voxel / prompt settings the runtime needs
    schedule.json            the schedule compiled in

The compile writes into a temporary directory next to ``ART`` and renames it into place at the
end, so a failed compile leaves neither ``ART`` nor the temporary directory behind.

This module imports torch lazily so that :mod:`adatoken_compile.runtime.engine` can share
:class:`Manifest` and the format constants without importing torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from adatoken_compile.errors import InputError

FORMAT = "adatoken-compile/artifact"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
EMBED_FILE = "embed_tokens.npy"
PREPROCESS_FILE = "preprocess.json"
SCHEDULE_FILE = "schedule.json"


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of an artifact directory."""

    path: str  # the artifact directory
    data: dict

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def files(self) -> dict:
        return self.data["files"]

    @property
    def family(self) -> str:
        return self.data["model"]["family"]

    def graph_bytes(self, name: str) -> int:
        """Size of a graph: its .onnx file plus its external-data files."""
        g = self.graphs[name]
        return sum(self.files[f]["size"] for f in [g["file"], *g.get("external_data", [])])

    def to_dict(self) -> dict:
        return self.data


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[compile] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- examples


def example_scene(num_views: int = 3, H: int = 60, W: int = 80, seed: int = 0):
    """A small deterministic scene (random colours, depths 1-4 m): only shapes matter for export."""
    import numpy as np

    from adatoken_compile.runtime.scene import Scene

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


EXAMPLE_QUESTIONS = ("what is in the room?", "how many chairs are next to the big table by the window?")


def example_samples(adapter) -> list:
    """Two samples with different question lengths (batch 2 with left padding)."""
    import numpy as np

    from adatoken_compile.contract import Sample

    if adapter.family == "llava3d":
        scene = example_scene()
        return [Sample(question=q, scene=scene) for q in EXAMPLE_QUESTIONS]
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (adapter.image_size + 8, adapter.image_size + 4, 3), dtype=np.uint8)
    return [Sample(question=q, image=img) for q in EXAMPLE_QUESTIONS]


def example_batch(adapter):
    return adapter.prepare(example_samples(adapter))


# ----------------------------------------------------------------------------- ONNX helpers


def graph_io(path: str) -> dict:
    """Inputs/outputs of an ONNX file: name, dtype, shape (ints or symbolic dim names)."""
    import onnx

    m = onnx.load(path, load_external_data=False)

    def vi(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    opset = next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": [vi(v) for v in m.graph.input], "outputs": [vi(v) for v in m.graph.output], "opset": opset}


def external_locations(path: str) -> list[str]:
    """Every external-data ``location`` referenced by tensors of an ONNX file (graph + subgraphs)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    locs: list[str] = []

    def tensor(t):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value not in locs:
                    locs.append(e.value)

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for sg in a.graphs:
                    graph(sg)

    graph(m.graph)
    return locs


def export_module_onnx(module, args: tuple, dynamic_shapes, path: str, input_names, output_names,
                       *, opset: int | None = None, external_data_threshold: int = 1024) -> dict:
    """torch.export (non-strict) -> torch.onnx (dynamo) -> ``path`` (+ ``path.data``), checked."""
    import onnx
    import onnx_ir as ir
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
        kw = {} if opset is None else {"opset_version": opset}
        prog = torch.onnx.export(ep, tuple(args), dynamo=True, input_names=list(input_names),
                                 output_names=list(output_names), optimize=True, verbose=False, **kw)
    ir.save(prog.model, path, external_data=os.path.basename(path) + ".data", size_threshold_bytes=external_data_threshold)
    onnx.checker.check_model(path, full_check=False)
    return {"export_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- graphs


def _export_encoders(adapter, tmp: str, opset, progress: bool) -> list[str]:
    import numpy as np
    import torch

    from adatoken_compile.runtime.scene import preprocess_scene, unproject_patches, voxelize

    if adapter.family == "llava3d":
        scene = example_scene()
        pre = preprocess_scene(scene, adapter.image_size, adapter.mean, adapter.std)
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, adapter.patch_size)
        args = (torch.from_numpy(pre.pixel_values).to(adapter.dtype), torch.from_numpy(xyz))
        views = torch.export.Dim("views", min=1, max=4096)
        t0 = time.perf_counter()
        export_module_onnx(adapter.encoder, args, ({0: views}, {0: views}), os.path.join(tmp, "encoder.onnx"),
                           ["pixel_values", "xyz"], ["features"], opset=opset)
        _log(progress, f"encoder.onnx exported ({time.perf_counter() - t0:.1f}s)")
        n = voxelize(xyz).num_tokens
        feats = torch.randn(max(n, 3), int(adapter.config.get("mm_hidden_size", adapter.encoder.vision.config.hidden_size)))
        tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
        t0 = time.perf_counter()
        export_module_onnx(adapter.projector, (feats.to(adapter.dtype),), ({0: tokens},), os.path.join(tmp, "projector.onnx"),
                           ["features"], ["tokens"], opset=opset)
        _log(progress, f"projector.onnx exported ({time.perf_counter() - t0:.1f}s)")
        return ["encoder", "projector"]
    rng = np.random.default_rng(0)
    pix = torch.from_numpy(rng.standard_normal((2, 3, adapter.image_size, adapter.image_size)).astype(np.float32))
    batch = torch.export.Dim("images", min=1, max=4096)
    t0 = time.perf_counter()
    export_module_onnx(adapter.encoder, (pix.to(adapter.dtype),), ({0: batch},), os.path.join(tmp, "encoder.onnx"),
                       ["pixel_values"], ["features"], opset=opset)
    _log(progress, f"encoder.onnx exported ({time.perf_counter() - t0:.1f}s)")
    return ["encoder"]


def decode_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("adatoken_compile.compiler.decode") is not None


def _export_prefill_decode(adapter, schedule, tmp: str, opset, progress: bool, decode: bool | None) -> tuple[list[str], dict]:
    from adatoken_compile.compiler.capture import capture
    from adatoken_compile.compiler.export import export_onnx
    from adatoken_compile.passes.token_drop import apply_token_drop

    example = example_batch(adapter)
    t0 = time.perf_counter()
    gm = capture(adapter.decoder, example)
    pg = apply_token_drop(gm, schedule)
    _log(progress, f"prefill captured + token-drop pass ({len(schedule.effective_cuts())} cuts, {time.perf_counter() - t0:.1f}s)")
    info = export_onnx(pg, example, os.path.join(tmp, "prefill.onnx"), opset_version=opset)
    _log(progress, f"prefill.onnx exported ({info.export_s:.1f}s, {info.topk_nodes} TopK)")
    names = ["prefill"]
    extra = {"prefill": {"adatoken_nodes": info.adatoken_nodes, "topk_nodes": info.topk_nodes}}
    if decode and not decode_available():
        raise InputError("compile: decode graph requested but adatoken_compile.compiler.decode is not installed")
    if decode is None:
        decode = decode_available()
    if decode:
        from adatoken_compile.compiler.decode import example_decode_feeds, export_decode_onnx

        t0 = time.perf_counter()
        export_decode_onnx(adapter.decoder, os.path.join(tmp, "decode.onnx"), example_decode_feeds(adapter.decoder),
                           opset_version=opset)
        _log(progress, f"decode.onnx exported ({time.perf_counter() - t0:.1f}s)")
        names.append("decode")
    else:
        _log(progress, "decode graph skipped: the artifact answers 1 token")
    return names, extra


def _preprocess_dict(adapter) -> dict:
    from adatoken_compile.runtime.prompt import BOXES_TOKEN_INDEX, IMAGE_TOKEN_INDEX, llava_hf_prompt, llava_v1_prompt
    from adatoken_compile.runtime.scene import MAX_SPATIAL_TOKENS, VOXEL_SIZE

    tok = adapter.tokenizer
    is3d = adapter.family == "llava3d"
    d = {
        "family": adapter.family,
        "image_size": int(adapter.image_size),
        "patch_size": int(adapter.patch_size if is3d else adapter.llava.config.vision_config.patch_size),
        "mean": [float(x) for x in adapter.mean],
        "std": [float(x) for x in adapter.std],
        "prompt": {
            "template": "llava_v1" if is3d else "llava_hf",
            "format": (llava_v1_prompt if is3d else llava_hf_prompt)("{question}"),
            "question_field": "{question}",
            "bos_once": True,
        },
        "placeholders": {"image": IMAGE_TOKEN_INDEX, "boxes": BOXES_TOKEN_INDEX},
        "bos_id": tok.bos_id,
        "eos_id": int(adapter.eos_token_id),
        "pad_id": int(tok.pad_id),
        "max_positions": int(adapter.max_positions),
        "arch": adapter.arch(),
        "dtype": "float32",
    }
    if is3d:
        d.update({"voxel_size": VOXEL_SIZE, "max_tokens": MAX_SPATIAL_TOKENS})
    return d


def _versions() -> dict:
    import importlib.metadata as md

    from adatoken_compile import __version__

    out = {"adatoken_compile": __version__}
    for pkg, dist in (("torch", "torch"), ("transformers", "transformers"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        try:
            out[pkg] = md.version(dist)
        except md.PackageNotFoundError:
            try:
                out[pkg] = md.version(dist + "-gpu") if pkg == "onnxruntime" else None
            except md.PackageNotFoundError:
                out[pkg] = None
    return out


def _file_table(root: str) -> dict:
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            files[rel] = {"sha256": sha256_file(full), "size": os.path.getsize(full)}
    return files


# ----------------------------------------------------------------------------- public API


def compile_artifact(adapter, schedule, out_dir: str, *, opset: int | None = None, progress: bool = True,
                     decode: bool | None = None) -> Manifest:
    """Compile ``adapter`` pruned by ``schedule`` into the artifact directory ``out_dir``.

    Refuses a schedule made for another model (:class:`ScheduleMismatch`). Writes to a temporary
    directory next to ``out_dir`` and renames it into place (an existing ``out_dir`` is replaced
    only after a successful compile). ``decode``: export the decode graph (default: when
    :mod:`adatoken_compile.compiler.decode` is available; without it the artifact answers one token).
    """
    import numpy as np
    import torch

    layers = int(adapter.describe()["layers"])
    schedule.validate()
    schedule.check_model(adapter.fingerprint(), layers)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: exists and is not a directory; choose another --out")
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _log(progress, f"compiling {adapter.family} ({layers} layers) with schedule "
             + (", ".join(f"L{c.layer}:{c.keep:.3g}" for c in schedule.cuts) or "identity") + f" -> {out_dir}")
        graphs = _export_encoders(adapter, tmp, opset, progress)
        more, extra = _export_prefill_decode(adapter, schedule, tmp, opset, progress, decode)
        graphs += more

        emb = adapter.decoder.get_input_embeddings().weight.detach().to(torch.float32).cpu().numpy()
        np.save(os.path.join(tmp, EMBED_FILE), np.ascontiguousarray(emb))
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        adapter.tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        pre = _preprocess_dict(adapter)
        with open(os.path.join(tmp, PREPROCESS_FILE), "w") as f:
            json.dump(pre, f, indent=2)
        schedule.save(os.path.join(tmp, SCHEDULE_FILE))

        files = _file_table(tmp)
        gtable = {}
        for name in graphs:
            fn = f"{name}.onnx"
            io = graph_io(os.path.join(tmp, fn))
            gtable[name] = {"file": fn, "external_data": external_locations(os.path.join(tmp, fn)), **io,
                            **extra.get(name, {})}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"fingerprint": adapter.fingerprint(), "family": adapter.family, "describe": adapter.describe()},
            "schedule": schedule.to_dict(),
            "graphs": gtable,
            "tokenizer": TOKENIZER_DIR,
            "embed_tokens": EMBED_FILE,
            "preprocess": PREPROCESS_FILE,
            "schedule_file": SCHEDULE_FILE,
            "versions": _versions(),
            "compile_s": round(time.perf_counter() - t_start, 3),
            "files": files,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"done in {manifest['compile_s']:.1f}s")
    return Manifest(out_dir, manifest)


def diff_text(adapter, schedule) -> str:
    """Human-readable graph diff of the token-drop pass (per cut: inserted nodes, rewired uses)."""
    from adatoken_compile.compiler.capture import capture
    from adatoken_compile.passes.graph_diff import diff_graphs, format_diff
    from adatoken_compile.passes.token_drop import apply_token_drop

    schedule.validate()
    schedule.check_model(adapter.fingerprint(), int(adapter.describe()["layers"]))
    gm = capture(adapter.decoder, example_batch(adapter))
    pg = apply_token_drop(gm, schedule)
    diffs = diff_graphs(gm, pg)
    if not diffs:
        return "no changes: the schedule drops no tokens (identity)"
    return format_diff(diffs)
