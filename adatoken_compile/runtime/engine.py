"""Run a compiled artifact with ONNX Runtime + numpy + tokenizers (no torch, no transformers).

::

    rt = load("ART")                               # verifies manifest, paths, hashes
    rt.generate(scene, "what is on the table?")    # -> str (greedy)
    rt.generate([s1, s2], ["q1", "q2"], max_new_tokens=16, temperature=0.2, top_p=0.9, seed=0)
    for piece in rt.stream(scene, "q"): print(piece, end="")

The prompt batch is built exactly as the PyTorch adapters build it (:mod:`adatoken_compile.runtime.prompt`):
BOS once, the model's template, text chunks tokenized around the placeholder, spatial tokens
spliced in, rows left-padded, position ids in the layout the artifact declares
(:mod:`adatoken_compile.runtime.positions`; ``0..n-1``, 1 on padding, by default). The ORT prefill
(pruned by the compiled schedule) returns per-layer caches of per-layer lengths; the decode graph
then continues each row from the ORIGINAL (unpruned) prompt's positions (``length + step`` by default).

What the encoder graphs take is declared by the artifact (``preprocess.json`` ``input``):
``scene`` (posed RGB-D views -> encoder -> voxel pooling -> projector) or ``image`` (one RGB
image -> encoder). Scenes may be given as ``.npz`` paths, scan folders or info files
(:mod:`adatoken_compile.runtime.sources`; ``num_frames`` views are selected as the checkpoint's
config says), images as arrays or paths; the image processing is the checkpoint's own, as
``preprocess.json`` ``image_processing`` records it.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from ..arch import normalize as normalize_arch
from ..artifact import RECOMPILE, Manifest, verify
from ..errors import InputError
from ..schedule import Schedule
from .image import ImageProcessing, patch_coordinates, processing_from_dict
from .qwen_vision import image_list, prompt_for_images, read_frames
from .sample import Sample, Video
from .prompt import BOXES_TOKEN_INDEX, IMAGE_TOKEN_INDEX, check_question, tokenize_with_placeholders
from .positions import layout_of
from .decoding import BufferedSteps, ConcatSteps, is_buffered
from .sampling import check_sampling, make_rng, next_tokens
from .scene import (Scene, limit_hint, limits, pool_numpy, preprocess_scene, unproject_patches,
                    validate_scene, voxelize)
from .session import check_graph_io, choose_providers, input_dtype, open_session
from .settings import read_settings
from .tokenizer import TextTokenizer
# the module, not its names: the readers import runtime modules, so either may be imported first
from . import sources as scene_paths


def first(outputs: dict) -> np.ndarray:
    """The first output of a graph (an encoder's features, whatever the adapter named them)."""
    return next(iter(outputs.values()))


class Runtime:
    """A loaded artifact: sessions, embeddings, tokenizer, preprocessing settings."""

    def __init__(self, manifest: Manifest, providers: Sequence[str] | str | None = None, threads: int | None = None):
        self.manifest = manifest
        self.path = manifest.path
        d = manifest.data
        # only files the manifest lists (and verify hashed) are opened
        self.pre = read_settings(os.path.join(self.path, d["preprocess"]), RECOMPILE)
        self.family = self.pre["family"]
        self.input_kind = self.pre["input"]
        self.eos_id = self.pre.get("eos_id")
        where = f"{self.path}/{d['preprocess']}"
        self.processing = (processing_from_dict(self.pre["image_processing"], where) if "image_processing" in self.pre
                           else ImageProcessing.clip(self.pre["image_size"], self.pre["mean"], self.pre["std"]))
        # the text around one image in the prompt, repeated per image when a prompt holds several
        self.image_unit = self.pre.get("image_unit")
        self.num_frames = self.pre.get("num_frames")
        self.max_positions = self.pre.get("max_positions")
        self.positions = layout_of(self.pre["positions"], where, RECOMPILE)
        self.arch = normalize_arch(self.pre["arch"], f"{self.path}/{d['preprocess']}")
        self.embed = _load_embeddings(os.path.join(self.path, d["embed_tokens"]), self.arch["hidden"])
        tok = d["tokenizer"].rstrip("/")
        config = f"{tok}/tokenizer_config.json"
        self.tokenizer = TextTokenizer.from_files(os.path.join(self.path, tok, "tokenizer.json"),
                                                  os.path.join(self.path, config) if config in d["files"] else None)
        self.num_layers = self.arch["num_layers"]
        self.schedule = Schedule.from_dict(d["schedule"], where=f"{self.path}/manifest.json")
        self.cuts = self.schedule.effective_cuts()
        if self.schedule.num_layers != self.num_layers:
            raise InputError(f"{self.path}: schedule of {self.schedule.num_layers} layers in a {self.num_layers}-layer "
                             f"artifact; {RECOMPILE}")
        # the most spatial tokens one prompt can hold: the voxel cap, or an image's patches
        most = self.pre["max_tokens"] if self.input_kind == "scene" else \
            (self.pre["image_size"] // self.pre["patch_size"]) ** 2
        if most > limits()["spatial_tokens"]:
            raise InputError(f"{self.path}/{d['preprocess']}: up to {most} spatial tokens a prompt, over the limit of "
                             f"{limits()['spatial_tokens']}; {RECOMPILE}, or {limit_hint('spatial_tokens')}")
        # artifacts compiled before precision was recorded are float32
        self.precision = d.get("precision") or {"dtype": "float32", "io_dtype": "float32", "quantize": None}
        wanted = choose_providers(providers)
        if self.precision.get("dtype") == "bfloat16" and "CUDAExecutionProvider" not in wanted:
            raise InputError(f"{self.path}: this artifact computes in bfloat16, which ONNX Runtime's CPU provider "
                             "cannot run; run it with --provider cuda (onnxruntime-gpu), or compile --dtype float16 "
                             "for CPU")
        self.sessions = {name: open_session(os.path.join(self.path, g["file"]), wanted, RECOMPILE, threads,
                                            spin=name == "decode")
                         for name, g in d["graphs"].items()}
        check_graph_io(self.sessions, self.input_kind, self.num_layers, len(self.cuts), self.path, RECOMPILE,
                       coords="xyz" in self.schedule.needs(),
                       encoder_inputs=getattr(self.processing, "ENCODER_INPUTS", None))
        self._check_position_rank()
        self.providers = self.sessions["prefill"].get_providers()
        self.provider = self.providers[0]
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        # what each graph input takes (float16 in a float16 artifact): feeds are cast to it
        self._types = {n: {i.name: input_dtype(i.type) for i in s.get_inputs()} for n, s in self.sessions.items()}
        self.last_kept: list[np.ndarray] = []
        self._last: dict | None = None
        # a decode graph with in-place buffers keeps them bound on the session's device; False feeds
        # and fetches them as numpy every step instead (to measure what the binding saves)
        self.bind_kv = True
        # bytes the last generation's decode steps moved across the session boundary, per step
        self.last_transfer: dict = {"kv_bytes_per_step": 0.0, "logits_bytes_per_step": 0.0, "steps": 0, "kv": None}

    def _check_position_rank(self) -> None:
        """Refuse, at load, graphs whose ``position_ids`` are not the declared layout's rank."""
        for name in ("prefill", "decode"):
            s = self.sessions.get(name)
            got = next((len(i.shape) for i in s.get_inputs() if i.name == "position_ids"), None) if s else None
            if got is not None and got != self.positions.rank:
                raise InputError(f"{self.path}: graph '{name}' takes {got}-D position_ids, but the artifact declares "
                                 f"the '{self.positions.name}' layout ({self.positions.rank}-D); {RECOMPILE}")

    def graph_path(self, name: str) -> str:
        """Path of one of the artifact's ONNX graphs (``encoder``, ``projector``, ``prefill``, ``decode``)."""
        if name not in self.manifest.data["graphs"]:
            raise InputError(f"{self.path}: artifact has no '{name}' graph")
        return os.path.join(self.path, self.manifest.data["graphs"][name]["file"])

    @property
    def has_decode(self) -> bool:
        return "decode" in self.sessions

    def run_graph(self, name: str, feeds: dict) -> dict[str, np.ndarray]:
        """Run one graph on the feeds it takes, floating-point arrays cast to its input dtypes."""
        sess, types = self.sessions[name], self._types[name]
        args = {}
        for k in self._inputs[name]:
            a = np.asarray(feeds[k])
            args[k] = a.astype(types[k]) if types[k] is not None and a.dtype.kind == "f" and a.dtype != types[k] else a
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, args)))

    # ------------------------------------------------------------------ inputs
    def _check_scene(self, scene, where: str) -> Scene:
        if isinstance(scene, Scene):
            return validate_scene({"images": scene.images, "depths": scene.depths, "poses": scene.poses,
                                   "intrinsics": scene.intrinsics}, name=scene.name)
        if isinstance(scene, (scene_paths.SceneRef, str, os.PathLike, dict)):
            return scene_paths.resolve_scene(scene, self.num_frames, where)
        raise InputError(f"{where}: this artifact takes a scene (Scene, dict of arrays, .npz path or scene folder), "
                         f"got {type(scene).__name__}")

    def encode(self, source) -> np.ndarray:
        """(N, H) float32 spatial tokens of a scene or an image, as the artifact's encoder takes."""
        return self.encode_with_coordinates(source)[0]

    def encode_with_coordinates(self, source) -> tuple[np.ndarray, np.ndarray]:
        """(N, H) float32 spatial tokens and their (N, 3) float32 coordinates: voxel centres in metres
        for a scene, (row, col, 0) of each patch for an image (what spatial selection rules read)."""
        if self.input_kind == "scene":
            return self._scene_tokens(source)
        encode = getattr(self.processing, "encode", None)  # processings whose encoder takes more than pixels
        if isinstance(source, Video):
            if encode is None or self.input_kind != "image":
                raise InputError(f"video: this artifact's model takes {self.input_kind}s, not videos; pass the frames "
                                 "as images")
            source = read_frames(source, scene_paths.resolve_image, self.processing.temporal_patch_size)
        elif encode is not None:
            source = scene_paths.resolve_image(source)
        if encode is not None and self.input_kind == "image":
            return encode(source, lambda feeds: first(self.run_graph("encoder", feeds)))
        tokens = self.encode_image(source)
        return tokens, patch_coordinates(tokens.shape[0])

    def encode_scene(self, scene) -> np.ndarray:
        """(N, H) float32 spatial tokens of a scene: encoder, voxel pooling, projector."""
        return self._scene_tokens(scene)[0]

    def _scene_tokens(self, scene) -> tuple[np.ndarray, np.ndarray]:
        if self.input_kind != "scene":
            raise InputError("this artifact takes an image ((H,W,3) uint8), not a scene")
        p = self.pre
        scene = self._check_scene(scene, "scene")
        pre = preprocess_scene(scene, p["image_size"], processing=self.processing)
        xyz = unproject_patches(pre.depths, pre.intrinsics, pre.poses, p["patch_size"])
        feats = first(self.run_graph("encoder", {"pixel_values": pre.pixel_values, "xyz": xyz}))
        vmap = voxelize(xyz, p.get("voxel_size", 0.2), p.get("max_tokens", 2560))
        # pooled in float32 whatever the encoder's precision (a mean of up to hundreds of patches)
        pooled = pool_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32), vmap)
        tokens = first(self.run_graph("projector", {"features": np.ascontiguousarray(pooled)}))
        return tokens, vmap.centers.astype(np.float32)

    def encode_image(self, image) -> np.ndarray:
        """(N, H) float32 image tokens of one (H, W, 3) uint8 image (or an image path)."""
        scene_like = (Scene, dict, scene_paths.SceneRef)
        if self.input_kind != "image" or isinstance(image, scene_like):
            raise InputError(f"this artifact takes a {self.input_kind}, got "
                             + ("a scene" if isinstance(image, scene_like) else type(image).__name__))
        if getattr(self.processing, "encode", None) is not None:
            return self.encode_with_coordinates(image)[0]
        pix = self.processing(scene_paths.resolve_image(image))
        return first(self.run_graph("encoder", {"pixel_values": pix[None]}))[0]

    def prompt_ids(self, question: str, images: int = 1) -> list[int]:
        check_question(question)
        fmt = self.pre["prompt"]["format"]
        if images != 1:
            if not self.image_unit:
                raise InputError(f"{images} images in one prompt: this artifact's model takes one image a prompt")
            fmt = prompt_for_images(fmt, images, self.image_unit)
        return tokenize_with_placeholders(self.tokenizer, fmt.replace(self.pre["prompt"].get("question_field", "{question}"), question))

    def _as_requests(self, items) -> list[Sample]:
        out = []
        scene_kind = self.input_kind == "scene"
        for i, it in enumerate(items):
            if isinstance(it, Sample):
                out.append(it)
            elif isinstance(it, (tuple, list)) and len(it) == 2:
                inp, q = it
                if scene_kind and isinstance(inp, (np.ndarray, scene_paths.ImageRef, Video)):
                    raise InputError(f"item {i}: this artifact takes scenes; got "
                                     + ("a video" if isinstance(inp, Video) else "an image array"
                                        if isinstance(inp, np.ndarray) else "an image file"))
                if not scene_kind and isinstance(inp, (Scene, dict, scene_paths.SceneRef)):
                    raise InputError(f"item {i}: this artifact takes images; got a scene")
                out.append(Sample(question=q, scene=inp) if scene_kind else Sample(question=q, image=inp))
            else:
                raise InputError(f"item {i}: expected (scene_or_image, question) or Sample, got {type(it).__name__}")
        for i, r in enumerate(out):
            if scene_kind and (r.scene is None or r.image is not None):
                raise InputError(f"item {i}: this artifact takes scenes: each request needs a scene (and no image)")
            if not scene_kind and (r.image is None or r.scene is not None):
                raise InputError(f"item {i}: this artifact takes images: each request needs an image (and no scene)")
        return out

    def prepare(self, items) -> dict[str, np.ndarray]:
        """Left-padded prefill feeds for ``items`` ((scene_or_image, question) pairs or Samples)."""
        reqs = self._as_requests(items)
        if not reqs:
            raise InputError("empty batch: pass at least one (scene, question)")
        cache: dict[int, tuple] = {}
        rows = []
        V = self.embed.shape[0]
        for i, r in enumerate(reqs):
            srcs = [r.scene] if r.scene is not None else image_list(r.image)
            parts = []
            for src in srcs:
                if id(src) not in cache:
                    cache[id(src)] = self.encode_with_coordinates(src)
                parts.append(cache[id(src)])
            n_spatial = sum(p[0].shape[0] for p in parts)
            if n_spatial < 1:
                raise InputError(f"item {i}: the scene gives 0 spatial tokens; a cut keeps k >= 1 per row")
            if n_spatial > limits()["spatial_tokens"]:  # several images in one prompt add up
                raise InputError(f"item {i}: {_count_inputs(srcs, r.scene is not None)} give {n_spatial} spatial tokens, "
                                 f"more than the limit "
                                 f"of {limits()['spatial_tokens']} a prompt; pass fewer or smaller images, or "
                                 f"{limit_hint('spatial_tokens')}")
            ids = self.prompt_ids(r.question, len(parts))
            if BOXES_TOKEN_INDEX in ids:
                raise InputError(f"item {i}: <boxes> location prompts are not supported by the artifact runtime")
            if ids.count(IMAGE_TOKEN_INDEX) != len(parts):
                raise InputError(f"item {i}: prompt must hold exactly {len(parts) if len(parts) > 1 else 'one'} <image> "
                                 f"placeholder{'s' if len(parts) > 1 else ''}, found {ids.count(IMAGE_TOKEN_INDEX)}")
            bad = [t for t in ids if t != IMAGE_TOKEN_INDEX and not (0 <= t < V)]
            if bad:
                raise InputError(f"item {i}: token id {bad[0]} outside the embedding table ({V}); {RECOMPILE}")
            rows.append(_splice(ids, self.embed, parts))
        L = max(e.shape[0] for e, _, _ in rows)
        if self.max_positions and L > self.max_positions:
            raise InputError(f"prompt of {L} tokens exceeds the model's max_position_embeddings={self.max_positions}; "
                             "use fewer spatial tokens or a shorter question")
        B, H = len(rows), rows[0][0].shape[1]
        feeds = {
            "inputs_embeds": np.zeros((B, L, H), self.embed.dtype),
            "attention_mask": np.zeros((B, L), np.int64),
            "spatial_mask": np.zeros((B, L), bool),
            "spatial_xyz": np.zeros((B, L, 3), np.float32),
        }
        for b, (emb, sm, xyz) in enumerate(rows):
            n = emb.shape[0]
            feeds["inputs_embeds"][b, L - n :] = emb
            feeds["attention_mask"][b, L - n :] = 1
            feeds["spatial_mask"][b, L - n :] = sm
            feeds["spatial_xyz"][b, L - n :] = xyz
        feeds["position_ids"] = self.positions.prefill(feeds["attention_mask"], feeds["spatial_mask"], feeds["spatial_xyz"])
        return feeds

    # ------------------------------------------------------------------ graphs
    def _check_feeds(self, feeds: dict) -> None:
        need = {"inputs_embeds": (3, "f"), "attention_mask": (2, np.int64),
                "position_ids": (self.positions.rank, np.int64),
                "spatial_mask": (2, np.bool_)}
        if "spatial_xyz" in self._inputs["prefill"]:  # the schedule's rules read token coordinates
            need["spatial_xyz"] = (3, np.float32)
        for k, (nd, dt) in need.items():
            a = feeds.get(k)
            ok = a is not None and np.asarray(a).ndim == nd and (
                np.asarray(a).dtype.kind == "f" if dt == "f" else np.asarray(a).dtype == dt)
            if not ok:
                what = "floating-point" if dt == "f" else np.dtype(dt).name
                raise InputError(f"prefill feeds: '{k}' must be a {nd}-D {what} array (use Runtime.prepare)")
        if self.cuts:
            n0 = (feeds["spatial_mask"] & feeds["attention_mask"].astype(bool)).sum(1)
            if (n0 < 1).any():
                raise InputError(f"row {int(np.argmin(n0))} has 0 spatial tokens; the schedule's cuts keep k >= 1 per row")

    def prefill(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run the (pruned) prefill graph; records :attr:`last_kept`."""
        self._check_feeds(feeds)
        out = self.run_graph("prefill", feeds)
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
        self._check_new_tokens(max_new_tokens)
        n = int(feeds["attention_mask"].sum(1).max())
        if self.max_positions and n + max_new_tokens > self.max_positions:
            raise InputError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
                             f"{self.max_positions}; use max_new_tokens <= {self.max_positions - n}")

    def _check_new_tokens(self, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if max_new_tokens > 1 and not self.has_decode:
            raise InputError(f"{self.path}: this artifact has no decode graph, so it can answer only 1 token "
                             f"(asked for {max_new_tokens}); {RECOMPILE} with adatoken_compile.compiler.decode available")

    def generate_ids(self, feeds: dict, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, ignore_eos: bool = False) -> Iterator[np.ndarray]:
        """Yield the (B,) token ids of each step (finished rows yield EOS); stops when all rows hit EOS.
        ``ignore_eos`` decodes exactly ``max_new_tokens`` steps (fixed-length benchmarks)."""
        self._check_generation(feeds, max_new_tokens)
        check_sampling(temperature, top_p, seed)
        out = self.prefill(feeds)
        pos = self.positions.start(feeds["attention_mask"], feeds["spatial_mask"],  # of the ORIGINAL prompt
                                   feeds.get("spatial_xyz"))
        yield from self.continue_ids(out, pos, max_new_tokens, temperature, top_p, seed, ignore_eos)

    def continue_ids(self, prefill_out: dict, positions: np.ndarray, max_new_tokens: int = 32,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     ignore_eos: bool = False) -> Iterator[np.ndarray]:
        """The generation after a prefill: ``prefill_out`` its outputs, ``positions`` (B,) or (B, 1)
        the index each row's first decoded token takes in the ORIGINAL (unpruned) prompt (its length
        in the ``sequence`` layout: :meth:`PositionLayout.start`). Records :attr:`last_transfer` when done."""
        self._check_new_tokens(max_new_tokens)
        check_sampling(temperature, top_p, seed)
        out = prefill_out
        B = out["logits"].shape[0]
        start = np.asarray(positions, np.int64).reshape(B)
        steps = None
        if max_new_tokens > 1:
            dec = self.sessions["decode"]
            steps = (BufferedSteps(dec, out, self.num_layers, max_new_tokens - 1, bind=self.bind_kv)
                     if is_buffered(dec) else ConcatSteps(dec, out, self.num_layers))
        rng = make_rng(seed) if temperature > 0 else None
        eos = self.eos_id
        fill = 0 if eos is None else int(eos)
        done = np.zeros(B, bool)
        logits = out["logits"]
        emb_type = self._types["decode"]["inputs_embeds"] if self.has_decode else None
        try:
            for t in range(max_new_tokens):
                toks = next_tokens(logits, temperature, top_p, rng)
                toks = np.where(done, fill, toks)
                yield toks
                if eos is not None and not ignore_eos:
                    done |= toks == eos
                if done.all() or t == max_new_tokens - 1:
                    break
                emb = self.embed[toks][:, None, :]
                logits = steps.step(emb.astype(emb_type, copy=False) if emb_type is not None else emb,
                                    self.positions.decode(start, t))
        finally:
            n = max(steps.steps, 1) if steps is not None else 1
            self.last_transfer = {"kv_bytes_per_step": float(steps.kv_bytes / n) if steps else 0.0,
                                  "logits_bytes_per_step": float(steps.logits_bytes / n) if steps else 0.0,
                                  "steps": steps.steps if steps else 0,
                                  "kv": _kv_form(steps)}

    def _pairs(self, scenes, questions) -> tuple[list[Sample], bool]:
        if isinstance(scenes, Sample):
            return [scenes], True
        if questions is None:
            raise InputError("pass a question (or a list of questions) with the scene(s)")
        if isinstance(questions, str):
            return self._as_requests([(scenes, questions)]), True
        if isinstance(questions, (bytes, dict)) or not hasattr(questions, "__iter__"):
            raise InputError(f"questions: expected a question (text) or a list of questions, got "
                             f"{type(questions).__name__}")
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


def _splice(ids: list[int], embed: np.ndarray, parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, spatial mask, coordinates) of one prompt: text ids embedded, each placeholder
    replaced by the next (tokens, coordinates) part."""
    embs, masks, coords, start = [], [], [], 0
    places = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]
    for k, end in enumerate(places):
        text = ids[start:end]
        embs.append(embed[text])
        masks.append(np.zeros(len(text), bool))
        coords.append(np.zeros((len(text), 3), np.float32))
        if k < len(parts):
            tokens, xyz = parts[k]
            embs.append(tokens.astype(embed.dtype))
            masks.append(np.ones(tokens.shape[0], bool))
            coords.append(np.asarray(xyz, np.float32))
        start = end + 1
    return np.concatenate(embs), np.concatenate(masks), np.concatenate(coords)


def _kv_form(steps) -> str | None:
    if steps is None:
        return None
    if isinstance(steps, BufferedSteps):
        return "buffers" if steps.bind else "buffers-numpy"
    return "concat"


def _load_embeddings(path: str, hidden: int) -> np.ndarray:
    """The (vocab, hidden) input-embedding table, refused when malformed or not finite."""
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({type(e).__name__}); {RECOMPILE}") from None
    if emb.ndim != 2 or emb.dtype.kind != "f" or emb.shape[1] != hidden or emb.shape[0] < 1:
        raise InputError(f"{path}: embeddings of shape {emb.shape} {emb.dtype}, expected (vocab, {hidden}) floats; "
                         f"{RECOMPILE}")
    if not np.isfinite(emb).all():
        raise InputError(f"{path}: embeddings hold NaN or inf values; {RECOMPILE} from a model with finite weights")
    return emb


def load(art_dir: str, providers: Sequence[str] | str | None = None, *, check_hashes: bool = True,
         expected_digest: str | None = None, threads: int | None = None) -> Runtime:
    """Verify and load an artifact directory.

    ``providers``: ``"auto"`` (default: CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or a
    list of ONNX Runtime provider names. ``expected_digest``: the ``sha256:...`` digest ``compile``
    printed; a different manifest is refused. ``threads``: ORT intra-op threads.

    Example::

        rt = load("runs/quickstart/artifacts/adaptive")
        print(rt.generate("scene.npz", "what color is the box?"))
    """
    return Runtime(verify(art_dir, check_hashes=check_hashes, expected_digest=expected_digest), providers, threads)


def _count_inputs(srcs: list, scene: bool) -> str:
    """What a prompt's spatial tokens came from, for messages: "1 scene", "2 images", "1 video and 1 image"."""
    if scene:
        return "1 scene"
    videos = sum(isinstance(s, Video) for s in srcs)
    images = len(srcs) - videos
    words = [f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((videos, "video"), (images, "image")) if n]
    return " and ".join(words)
