"""Run a compiled artifact with ONNX Runtime + numpy + tokenizers (no torch, no transformers).

::

    rt = load("ART")                               # verifies manifest, paths, hashes
    rt.generate(scene, "what is on the table?")    # -> str (greedy)
    rt.generate([s1, s2], ["q1", "q2"], max_new_tokens=16, temperature=0.2, top_p=0.9, seed=0)
    for piece in rt.stream(scene, "q"): print(piece, end="")

The prompt batch is built exactly as the PyTorch adapters build it (:mod:`adatoken_compile.runtime.prompt`):
BOS once, the family's template, text chunks tokenized around the placeholder, spatial tokens
spliced in, rows left-padded, position ids ``0..n-1`` (1 on padding). The ORT prefill (pruned by
the compiled schedule) returns per-layer caches of per-layer lengths; the decode graph then
continues each row at position ``original (unpruned) prompt length + step``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from adatoken_compile.compiler.pipeline import FORMAT, MANIFEST, VERSION, Manifest, sha256_file
from adatoken_compile.errors import InputError
from adatoken_compile.runtime.prompt import BOXES_TOKEN_INDEX, IMAGE_TOKEN_INDEX, preprocess_image, tokenize_with_placeholders
from adatoken_compile.runtime.scene import Scene, load_scene, pool_numpy, preprocess_scene, unproject_patches, validate_scene, voxelize

RECOMPILE = "recompile it with `adatoken-compile compile`"


@dataclass
class Request:
    """One question about one scene (LLaVA-3D artifact) or image (HF LLaVA artifact)."""

    question: str
    scene: Scene | None = None
    image: np.ndarray | None = None
    answer: str | None = None  # ground truth, when known (CLI demo)
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- verification


def _inside(root_real: str, rel: str, art: str, what: str) -> str:
    """Absolute path of ``rel`` under ART; refuses absolute paths, ``..`` and symlinks leaving ART."""
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{art}: manifest names an empty/invalid path for {what}; {RECOMPILE}")
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise InputError(f"{art}: {what} path '{rel}' is absolute; artifact paths must stay inside the artifact directory")
    if ".." in parts:
        raise InputError(f"{art}: {what} path '{rel}' contains '..'; artifact paths must stay inside the artifact directory")
    full = os.path.join(art, *parts)
    real = os.path.realpath(full)
    if not (real == root_real or real.startswith(root_real + os.sep)):
        raise InputError(f"{art}: {what} path '{rel}' resolves outside the artifact ({real}, via a symlink); refusing to load it")
    return full


def verify(art_dir: str, *, check_hashes: bool = True) -> Manifest:
    """Check format/version, that every path stays inside ART, and every file's size and sha256."""
    from adatoken_compile.compiler.pipeline import external_locations

    art = os.path.abspath(art_dir)
    if not os.path.isdir(art):
        raise InputError(f"{art_dir}: artifact directory not found; create one with `adatoken-compile compile --out DIR`")
    mpath = os.path.join(art, MANIFEST)
    if not os.path.isfile(mpath):
        raise InputError(f"{art_dir}: no {MANIFEST}; not an adatoken-compile artifact ({RECOMPILE})")
    try:
        with open(mpath) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{mpath}: unreadable manifest ({e}); {RECOMPILE}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{mpath}: not an adatoken-compile artifact manifest (format {data.get('format')!r}); {RECOMPILE}")
    if data.get("version") != VERSION:
        raise InputError(f"{mpath}: artifact version {data.get('version')} unsupported (this runtime reads {VERSION}); {RECOMPILE}")
    for key in ("files", "graphs", "model", "schedule"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"{mpath}: manifest lacks '{key}'; {RECOMPILE}")
    root_real = os.path.realpath(art)
    files = data["files"]
    for rel in files:
        _inside(root_real, rel, art, "file")
    named = [(g["file"], f"graph '{n}'") for n, g in data["graphs"].items()]
    named += [(data.get("embed_tokens", ""), "embed_tokens"), (data.get("preprocess", ""), "preprocess")]
    named += [(os.path.join(data.get("tokenizer", ""), "tokenizer.json").replace(os.sep, "/"), "tokenizer")]
    for rel, what in named:
        _inside(root_real, rel, art, what)
        if rel.replace("\\", "/") not in files:
            raise InputError(f"{art}: {what} file '{rel}' is not listed (hashed) in the manifest; {RECOMPILE}")
    for rel, info in files.items():
        full = _inside(root_real, rel, art, "file")
        if not os.path.isfile(full):
            raise InputError(f"{os.path.join(art, rel)}: missing from the artifact; {RECOMPILE}")
        size = os.path.getsize(full)
        if size != int(info.get("size", -1)):
            raise InputError(f"{os.path.join(art, rel)}: size {size} != {info.get('size')} in the manifest "
                             f"(truncated or modified); {RECOMPILE}")
        if check_hashes and sha256_file(full) != info.get("sha256"):
            raise InputError(f"{os.path.join(art, rel)}: sha256 differs from the manifest (file tampered or corrupted); {RECOMPILE}")
    for name, g in data["graphs"].items():
        gpath = _inside(root_real, g["file"], art, f"graph '{name}'")
        try:
            locs = external_locations(gpath)
        except Exception as e:
            raise InputError(f"{gpath}: not a readable ONNX file ({type(e).__name__}); {RECOMPILE}")
        gdir = os.path.dirname(g["file"])
        for loc in locs:
            rel = os.path.normpath(os.path.join(gdir, loc)).replace(os.sep, "/") if not os.path.isabs(loc) else loc
            if os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
                raise InputError(f"{gpath}: external-data location '{loc}' points outside the artifact; refusing to load it")
            _inside(root_real, rel, art, f"external data of graph '{name}'")
            if rel not in files:
                raise InputError(f"{gpath}: external-data file '{loc}' is not listed (hashed) in the manifest; {RECOMPILE}")
    return Manifest(art, data)


# ----------------------------------------------------------------------------- providers


def choose_providers(providers: Sequence[str] | None = None) -> list[str]:
    """CUDA when onnxruntime-gpu is installed and a GPU is visible, else CPU (or ``providers`` as given)."""
    import onnxruntime as ort

    if providers:
        return list(providers)
    avail = ort.get_available_providers()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() not in ("", "-1")
    if "CUDAExecutionProvider" in avail and visible:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(onnx_path: str, providers: Sequence[str] = ("CPUExecutionProvider",), *, threads: int | None = None,
                 profile_prefix: str | None = None, optimized_model_filepath: str | None = None, level: str = "all"):
    """An ORT session (ORT_ENABLE_ALL by default); ``threads`` sets intra-op threads (inter-op 1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = optimized_model_filepath
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=list(providers))


def _session(path: str, providers: list[str]):
    try:
        return make_session(path, providers)
    except Exception as e:
        if providers != ["CPUExecutionProvider"]:  # e.g. CUDA libraries missing: fall back to CPU
            return make_session(path)
        raise InputError(f"{path}: ONNX Runtime could not load the graph ({type(e).__name__}: {str(e)[:200]}); {RECOMPILE}")


# ----------------------------------------------------------------------------- runtime


class Runtime:
    """A loaded artifact: sessions, embeddings, tokenizer, preprocessing settings."""

    def __init__(self, manifest: Manifest, providers: Sequence[str] | None = None):
        from adatoken_compile.runtime.tokenizer import TextTokenizer

        self.manifest = manifest
        self.path = manifest.path
        d = manifest.data
        with open(os.path.join(self.path, d["preprocess"])) as f:
            self.pre = json.load(f)
        self.family = self.pre["family"]
        self.embed = np.load(os.path.join(self.path, d["embed_tokens"]), allow_pickle=False)
        self.tokenizer = TextTokenizer.from_dir(os.path.join(self.path, d["tokenizer"]))
        self.eos_id = self.pre.get("eos_id")
        self.max_positions = self.pre.get("max_positions")
        self.arch = self.pre["arch"]
        self.num_layers = int(self.arch["layers"])
        sch = d["schedule"]
        self.cuts = [c for c in _effective(sch["cuts"])]
        wanted = choose_providers(providers)
        self.sessions = {}
        for name, g in d["graphs"].items():
            self.sessions[name] = _session(os.path.join(self.path, g["file"]), wanted)
        self.providers = self.sessions["prefill"].get_providers()
        self.provider = self.providers[0]
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        self.last_kept: list[np.ndarray] = []
        self._last: dict | None = None

    def graph_path(self, name: str) -> str:
        """Path of one of the artifact's ONNX graphs (``encoder``, ``projector``, ``prefill``, ``decode``)."""
        if name not in self.manifest.data["graphs"]:
            raise InputError(f"{self.path}: artifact has no '{name}' graph")
        return os.path.join(self.path, self.manifest.data["graphs"][name]["file"])

    @property
    def has_decode(self) -> bool:
        return "decode" in self.sessions

    # ------------------------------------------------------------------ inputs
    def _check_scene(self, scene, where: str) -> Scene:
        if isinstance(scene, str):
            return load_scene(scene)
        if isinstance(scene, Scene):
            return validate_scene({"images": scene.images, "depths": scene.depths, "poses": scene.poses,
                                   "intrinsics": scene.intrinsics}, name=scene.name)
        if isinstance(scene, dict):
            return validate_scene(scene, name=where)
        raise InputError(f"{where}: this artifact ({self.family}) takes a scene (Scene, dict of arrays or .npz path), "
                         f"got {type(scene).__name__}")

    def encode_scene(self, scene) -> np.ndarray:
        """(N, H) float32 spatial tokens of a scene (LLaVA-3D) or an image (HF LLaVA)."""
        p = self.pre
        if self.family != "llava3d":
            return self.encode_image(scene)
        scene = self._check_scene(scene, "scene")
        pre = preprocess_scene(scene, p["image_size"], p["mean"], p["std"])
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, p["patch_size"])
        feats = self.sessions["encoder"].run(None, {"pixel_values": pre.pixel_values, "xyz": xyz})[0]
        vmap = voxelize(xyz, p.get("voxel_size", 0.2), p.get("max_tokens", 2560))
        pooled = pool_numpy(feats.reshape(-1, feats.shape[-1]), vmap)
        return self.sessions["projector"].run(None, {"features": np.ascontiguousarray(pooled, np.float32)})[0]

    def encode_image(self, image) -> np.ndarray:
        if self.family == "llava3d":
            raise InputError("this artifact is LLaVA-3D: pass a scene, not an image")
        if isinstance(image, (Scene, dict, str)):
            raise InputError(f"this artifact ({self.family}) takes an image ((H,W,3) uint8), got a scene")
        pix = preprocess_image(image, self.pre["image_size"], self.pre["mean"], self.pre["std"])
        return self.sessions["encoder"].run(None, {"pixel_values": pix[None]})[0][0]

    def prompt_ids(self, question: str) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise InputError("question must be a non-empty string")
        fmt = self.pre["prompt"]["format"]
        return tokenize_with_placeholders(self.tokenizer, fmt.replace(self.pre["prompt"].get("question_field", "{question}"), question))

    def _as_requests(self, items) -> list[Request]:
        out = []
        for i, it in enumerate(items):
            if isinstance(it, Request):
                out.append(it)
            elif isinstance(it, (tuple, list)) and len(it) == 2:
                inp, q = it
                if self.family == "llava3d":
                    if isinstance(inp, np.ndarray):
                        raise InputError(f"item {i}: this artifact is LLaVA-3D (scenes); got an image array -- "
                                         "a batch cannot mix families")
                    out.append(Request(question=q, scene=inp))
                else:
                    if isinstance(inp, (Scene, dict, str)):
                        raise InputError(f"item {i}: this artifact is HF LLaVA (images); got a scene -- "
                                         "a batch cannot mix families")
                    out.append(Request(question=q, image=inp))
            else:
                raise InputError(f"item {i}: expected (scene_or_image, question) or Request, got {type(it).__name__}")
        for i, r in enumerate(out):
            if self.family == "llava3d" and (r.scene is None or r.image is not None):
                raise InputError(f"item {i}: this artifact is LLaVA-3D: each request needs a scene (and no image)")
            if self.family != "llava3d" and (r.image is None or r.scene is not None):
                raise InputError(f"item {i}: this artifact is HF LLaVA: each request needs an image (and no scene)")
        return out

    def prepare(self, items) -> dict[str, np.ndarray]:
        """Left-padded prefill feeds for ``items`` ((scene_or_image, question) pairs or Requests)."""
        reqs = self._as_requests(items)
        if not reqs:
            raise InputError("empty batch: pass at least one (scene, question)")
        cache: dict[int, np.ndarray] = {}
        rows = []
        V = self.embed.shape[0]
        for i, r in enumerate(reqs):
            src = r.scene if r.scene is not None else r.image
            key = id(src)
            if key not in cache:
                cache[key] = self.encode_scene(src) if self.family == "llava3d" else self.encode_image(src)
            spatial = cache[key]
            if spatial.shape[0] < 1:
                raise InputError(f"item {i}: the scene gives 0 spatial tokens; a cut keeps k >= 1 per row")
            ids = self.prompt_ids(r.question)
            if BOXES_TOKEN_INDEX in ids:
                raise InputError(f"item {i}: <boxes> location prompts are not supported by the artifact runtime")
            if ids.count(IMAGE_TOKEN_INDEX) != 1:
                raise InputError(f"item {i}: prompt must hold exactly one <image> placeholder, found {ids.count(IMAGE_TOKEN_INDEX)}")
            bad = [t for t in ids if t != IMAGE_TOKEN_INDEX and not (0 <= t < V)]
            if bad:
                raise InputError(f"item {i}: token id {bad[0]} outside the embedding table ({V}); {RECOMPILE}")
            k = ids.index(IMAGE_TOKEN_INDEX)
            pre, post = ids[:k], ids[k + 1 :]
            emb = np.concatenate([self.embed[pre], spatial.astype(np.float32), self.embed[post]], axis=0)
            sm = np.zeros(emb.shape[0], bool)
            sm[len(pre) : len(pre) + spatial.shape[0]] = True
            rows.append((emb, sm))
        L = max(e.shape[0] for e, _ in rows)
        if self.max_positions and L > self.max_positions:
            raise InputError(f"prompt of {L} tokens exceeds the model's max_position_embeddings={self.max_positions}; "
                             "use fewer spatial tokens or a shorter question")
        B, H = len(rows), rows[0][0].shape[1]
        feeds = {
            "inputs_embeds": np.zeros((B, L, H), np.float32),
            "attention_mask": np.zeros((B, L), np.int64),
            "position_ids": np.ones((B, L), np.int64),
            "spatial_mask": np.zeros((B, L), bool),
        }
        for b, (emb, sm) in enumerate(rows):
            n = emb.shape[0]
            feeds["inputs_embeds"][b, L - n :] = emb
            feeds["attention_mask"][b, L - n :] = 1
            feeds["position_ids"][b, L - n :] = np.arange(n)
            feeds["spatial_mask"][b, L - n :] = sm
        return feeds

    # ------------------------------------------------------------------ graphs
    def _check_feeds(self, feeds: dict) -> None:
        need = {"inputs_embeds": (3, np.float32), "attention_mask": (2, np.int64), "position_ids": (2, np.int64),
                "spatial_mask": (2, np.bool_)}
        for k, (nd, dt) in need.items():
            a = feeds.get(k)
            if a is None or np.asarray(a).ndim != nd or np.asarray(a).dtype != dt:
                raise InputError(f"prefill feeds: '{k}' must be a {nd}-D {np.dtype(dt).name} array (use Runtime.prepare)")
        if self.cuts:
            n0 = (feeds["spatial_mask"] & feeds["attention_mask"].astype(bool)).sum(1)
            if (n0 < 1).any():
                raise InputError(f"row {int(np.argmin(n0))} has 0 spatial tokens; the schedule's cuts keep k >= 1 per row")

    def prefill(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run the (pruned) prefill graph; records :attr:`last_kept`."""
        self._check_feeds(feeds)
        sess = self.sessions["prefill"]
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(None, {k: feeds[k] for k in self._inputs["prefill"]})))
        self.last_kept = [out[f"kept.{c}"] for c in range(len(self.cuts))]
        self._last = out
        return out

    def kv_cache_bytes(self, outputs: dict | None = None, new_tokens: int = 0) -> list[int]:
        """Per-request K+V cache bytes after a prefill (valid positions of every layer, no padding),
        plus ``new_tokens`` decoded positions per layer."""
        out = outputs if outputs is not None else self._last
        if out is None:
            raise InputError("kv_cache_bytes: run prefill (or generate) first, or pass its outputs")
        per_tok = 2 * int(self.arch["kv_heads"]) * int(self.arch["head_dim"]) * out["key.0"].dtype.itemsize
        B = out["logits"].shape[0]
        res = [0] * B
        for i in range(self.num_layers):
            counts = np.asarray(out[f"mask.{i}"], bool).sum(1)
            for b in range(B):
                res[b] += (int(counts[b]) + int(new_tokens)) * per_tok
        return res

    # ------------------------------------------------------------------ generation
    def _check_generation(self, feeds: dict, max_new_tokens: int) -> None:
        if int(max_new_tokens) < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens > 1 and not self.has_decode:
            raise InputError(f"{self.path}: this artifact has no decode graph, so it can answer only 1 token "
                             f"(asked for {max_new_tokens}); {RECOMPILE} with adatoken_compile.compiler.decode available")
        n = int(feeds["attention_mask"].sum(1).max())
        if self.max_positions and n + max_new_tokens > self.max_positions:
            raise InputError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
                             f"{self.max_positions}; use max_new_tokens <= {self.max_positions - n}")

    def generate_ids(self, feeds: dict, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, ignore_eos: bool = False) -> Iterator[np.ndarray]:
        """Yield the (B,) token ids of each step (finished rows yield EOS); stops when all rows hit EOS.
        ``ignore_eos`` decodes exactly ``max_new_tokens`` steps (fixed-length benchmarks)."""
        from adatoken_compile.runtime.sampling import make_rng, next_tokens

        self._check_generation(feeds, max_new_tokens)
        out = self.prefill(feeds)
        B = out["logits"].shape[0]
        pos = feeds["attention_mask"].sum(1).astype(np.int64)[:, None]  # ORIGINAL lengths
        past = {}
        for i in range(self.num_layers):
            past[f"past_key.{i}"] = out[f"key.{i}"]
            past[f"past_value.{i}"] = out[f"value.{i}"]
            past[f"past_mask.{i}"] = out[f"mask.{i}"].astype(bool)
        rng = make_rng(seed) if temperature > 0 else None
        eos = self.eos_id
        fill = 0 if eos is None else int(eos)
        done = np.zeros(B, bool)
        logits = out["logits"]
        for t in range(max_new_tokens):
            toks = next_tokens(logits, temperature, top_p, rng)
            toks = np.where(done, fill, toks)
            yield toks
            if eos is not None and not ignore_eos:
                done |= toks == eos
            if done.all() or t == max_new_tokens - 1:
                break
            sess = self.sessions["decode"]
            feed = {"inputs_embeds": self.embed[toks][:, None, :], "position_ids": pos, **past}
            names = [o.name for o in sess.get_outputs()]
            res = dict(zip(names, sess.run(None, {k: feed[k] for k in self._inputs["decode"]})))
            logits = res["logits"]
            past = {k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
            pos = pos + 1

    def _pairs(self, scenes, questions) -> tuple[list[Request], bool]:
        if isinstance(scenes, Request):
            return [scenes], True
        if questions is None:
            raise InputError("pass a question (or a list of questions) with the scene(s)")
        if isinstance(questions, str):
            return self._as_requests([(scenes, questions)]), True
        qs = list(questions)
        if isinstance(scenes, (list, tuple)):
            if len(scenes) != len(qs):
                raise InputError(f"{len(scenes)} scenes but {len(qs)} questions; pass one scene per question (or one scene)")
            return self._as_requests(list(zip(scenes, qs))), False
        return self._as_requests([(scenes, q) for q in qs]), False

    def generate(self, scenes, questions=None, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None):
        """Answer text: ``str`` for one (scene, question), ``list[str]`` for lists (batched, left-padded)."""
        reqs, single = self._pairs(scenes, questions)
        feeds = self.prepare(reqs)
        B = len(reqs)
        ids: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        for toks in self.generate_ids(feeds, max_new_tokens, temperature, top_p, seed):
            for b in range(B):
                if done[b]:
                    continue
                if self.eos_id is not None and int(toks[b]) == int(self.eos_id):
                    done[b] = True
                else:
                    ids[b].append(int(toks[b]))
        self.last_ids = ids
        texts = [self.tokenizer.decode(r).strip() for r in ids]
        return texts[0] if single else texts

    def stream(self, scene, question: str | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Yield text pieces of the answer to one request as tokens are generated."""
        reqs, _ = self._pairs(scene, question if question is not None else getattr(scene, "question", None))
        if len(reqs) != 1:
            raise InputError("stream: pass one scene and one question (use generate for batches)")
        feeds = self.prepare(reqs)
        ids: list[int] = []
        prev = ""
        for toks in self.generate_ids(feeds, max_new_tokens, temperature, top_p, seed):
            t = int(toks[0])
            if self.eos_id is not None and t == int(self.eos_id):
                break
            ids.append(t)
            text = self.tokenizer.decode(ids).lstrip()
            if len(text) > len(prev) and text.startswith(prev):
                yield text[len(prev):]
                prev = text

    # ------------------------------------------------------------------ CLI helpers
    def sample_from_args(self, scene: str | None = None, image: str | None = None, question: str | None = None,
                         seed: int = 2_000_000) -> Request:
        """A Request from CLI arguments; without ``--scene`` (LLaVA-3D) a generated test scene (torch-free)."""
        if self.family == "llava3d":
            if image:
                raise InputError("this artifact is LLaVA-3D: pass --scene S.npz, not --image")
            if scene:
                if not question:
                    raise InputError("pass --question with --scene")
                return Request(question=question, scene=load_scene(scene))
            from adatoken_compile.benchmark3d.questions import questions_for
            from adatoken_compile.benchmark3d.render import render_scene
            from adatoken_compile.benchmark3d.world import make_world

            info = make_world(seed)
            sc = render_scene(info).scene
            q = questions_for(info)[0]
            return Request(question=question or q.text, scene=sc, answer=None if question else q.answer,
                           meta={"seed": seed})
        if scene:
            raise InputError("this artifact is HF LLaVA: pass --image, not --scene")
        if not image or not question:
            raise InputError("HF LLaVA artifact: pass --image IMG (.npy (H,W,3) uint8 or an image file) and --question")
        return Request(question=question, image=load_image(image))


def _effective(cuts: list[dict]) -> list[dict]:
    out, prev = [], 1.0
    for c in cuts:
        if float(c["keep"]) < prev:
            out.append(c)
            prev = float(c["keep"])
    return out


def load_image(path: str) -> np.ndarray:
    """An RGB image (any format Pillow reads, or a (H,W,3) uint8 .npy) as a uint8 array."""
    if not os.path.exists(path):
        raise InputError(f"{path}: image not found")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    from PIL import Image

    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except Exception as e:
        raise InputError(f"{path}: unreadable image ({e})")


def load(art_dir: str, providers: Sequence[str] | None = None, *, check_hashes: bool = True) -> Runtime:
    """Verify and load an artifact directory (see :func:`verify`); CUDA when available, else CPU."""
    return Runtime(verify(art_dir, check_hashes=check_hashes), providers)
