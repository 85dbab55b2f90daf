"""Where a calibration runs: device, precision, memory budget, and the layer-major engine.

Sample-major calibration (the default for a model that fits) holds the whole decoder and runs each
batch through every layer. A model larger than the memory budget runs **layer-major** instead, as
the post-training quantisers do (llm-compressor's sequential pipeline, GPTQModel, AutoRound): the
decoder's layers are read from the checkpoint one at a time (the lazy weights ``compile`` streams,
:class:`adatoken_compile.models.checkpoint.LazyWeights`), and each loaded layer runs over every
batch of a chunk before the next is read, the chunk's per-batch states
(:class:`adatoken_compile.compiler.executor.PrefillExecutor`) waiting in memory between layers.
The same executor, observer and scoring run in both orders, so the statistics are the same int64
arrays and the validations the same counts; only the loop order differs.

* :func:`observe` -- the attention statistics (the observer's ``plan`` / ``on_layer`` / ``finish``);
* :class:`LayeredValidation` -- the solver's validation cache whose unpruned references and pruned
  candidates run layer-major, a chunk of held-back batches at a time, so that a candidate's early
  stop (more disagreements than the fidelity target allows) ends its run at a chunk boundary; the
  candidates of one round run together as a prefix tree of schedules (:func:`tree_logits`);
* :func:`plan` -- device, dtype and memory checked before anything loads, and the engine chosen.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from adatoken_compile import distributed
from adatoken_compile.compiler.executor import PrefillExecutor
from adatoken_compile.errors import InputError
from adatoken_compile.models.spec import spec_for

ENGINES = ("auto", "sample", "layered")
DEVICE_HELP = "cpu, cuda or cuda:N"
# what a process holds besides weights and states (torch, the tokenizer, the data, the allocator's slack)
RUNTIME_BYTES = 1 << 30
MIN_CHUNK_BYTES = 256 << 20  # the smallest budget for one chunk's states that is worth a pass over the weights
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


# ---------------------------------------------------------------------- options
def parse_memory(text) -> int:
    """``12GB``, ``8GiB``, ``500MB``, ``2e9`` -> bytes (one-line error otherwise)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--max-memory {text!r}: give a size such as 12GB, 8GiB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def check_device(device: str | None) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> a usable torch device, or one line before anything loads.
    Under torchrun ``cuda`` is each process's LOCAL_RANK GPU."""
    name = str(device or "cpu").strip().lower()
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise InputError(f"--device {device!r}: choose {DEVICE_HELP}")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
    index = int(m.group(2)) if m.group(2) is not None else (
        int(os.environ.get("LOCAL_RANK", 0)) if distributed.active() else torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """One line when ``device`` cannot multiply matrices in ``dtype`` (bfloat16 on a pre-Ampere GPU)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 matmul; "
                         "use --dtype float16 or float32")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError as e:
        raise InputError(f"--dtype {str(dtype).removeprefix('torch.')}: not supported on {device} "
                         f"({' '.join(str(e).split())[:120]}); use --dtype float32") from None


# ---------------------------------------------------------------------- memory
@dataclass
class Footprint:
    """Bytes of a checkpoint's weights in the compute dtype: all of them, the largest decoder layer,
    the head (final norm and lm_head) and what a layer-major run keeps resident (the rest)."""

    whole: int
    layer: int
    head: int
    resident: int
    layers: int

    def sample_major(self) -> int:
        return self.whole + RUNTIME_BYTES

    def streamed(self) -> int:
        """Streamed weights held at once: the layer that runs and the next one, read meanwhile."""
        return 2 * max(self.layer, self.head)

    def layered(self) -> int:
        """The least a layer-major run needs: the resident weights, two layers, one chunk."""
        return self.resident + self.streamed() + RUNTIME_BYTES + MIN_CHUNK_BYTES


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def footprint(model_dir: str, itemsize: int, vision_dir: str | None = None) -> Footprint:
    """The :class:`Footprint` of a checkpoint directory from its safetensors headers (nothing read)."""
    from safetensors import safe_open

    from adatoken_compile.models.checkpoint import weight_files

    per_layer: dict[int, int] = {}
    whole = head = 0
    files = weight_files(model_dir) + (weight_files(vision_dir) if vision_dir and os.path.isdir(vision_dir) else [])
    vision = set(files[len(weight_files(model_dir)):])
    for path in files:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= int(d)
                b = n * itemsize
                whole += b
                m = _LAYER.search(k)
                if path in vision or "vision_tower" in k:
                    continue
                if m:
                    per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + b
                elif k.startswith("lm_head.") or k.endswith(".norm.weight") and "layers" not in k:
                    head += b
    layer = max(per_layer.values(), default=0)
    return Footprint(whole, layer, head, whole - sum(per_layer.values()) - head, len(per_layer))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass
class Plan:
    """Where and how a calibration runs (:func:`plan`)."""

    device: torch.device
    dtype: torch.dtype
    engine: str  # "sample" or "layered"
    max_memory: int | None
    footprint: Footprint | None = None

    def chunk_bytes(self) -> int | None:
        """The layered engine's budget for one chunk's states, out of ``max_memory`` or, without
        one, this machine's memory (None: unbounded, for a model whose weights are not measured)."""
        if self.footprint is None:
            return None
        fp = self.footprint
        budget = self.max_memory if self.max_memory is not None else physical_memory()
        return max(MIN_CHUNK_BYTES, budget - fp.resident - fp.streamed() - RUNTIME_BYTES)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(model_dir: str | None, *, device: str | None = "cpu", dtype: str = "float32", engine: str = "auto",
         max_memory=None, vision_dir: str | None = None) -> Plan:
    """Check the device, the dtype and the memory budget before anything loads and choose the engine:
    ``auto`` runs sample-major when the whole model fits ``max_memory`` (default: this machine's
    memory), else layer-major; ``layered`` refuses a budget below one layer plus one chunk."""
    from adatoken_compile.compiler.weights import torch_dtype

    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: choose {', '.join(ENGINES)}")
    dt = torch_dtype(dtype)
    dev = check_device(device)
    check_dtype(dt, dev)
    budget = parse_memory(max_memory) if max_memory is not None else None
    fp = footprint(model_dir, torch.empty((), dtype=dt).element_size(), vision_dir) if model_dir else None
    if fp is not None and budget is not None and engine != "sample" and fp.layered() > budget:
        raise InputError(f"--max-memory {max_memory}: too small for this model in {dtype}; layer-major "
                         f"calibration needs at least {_gb(fp.layered())} (the encoder and embeddings "
                         f"{_gb(fp.resident)}, a layer and the next {_gb(fp.streamed())}, one chunk of states "
                         f"{_gb(MIN_CHUNK_BYTES)}, the runtime {_gb(RUNTIME_BYTES)}); raise --max-memory")
    if engine == "auto":
        fits = fp is None or fp.sample_major() <= (budget if budget is not None else physical_memory())
        engine = "sample" if fits else "layered"
    if engine == "layered" and distributed.active():
        raise InputError("--engine layered runs in one process; start it without torchrun (or use --engine sample)")
    return Plan(dev, dt, engine, budget, fp)


# ---------------------------------------------------------------------- spilled states
SPILL_MARGIN = 1 << 30  # disk left free beside the spilled states


class Spill:
    """Memory-mapped files for the states of a chunk past the memory budget, so that one pass over
    the weights serves every batch. The files live in a directory of its own that the first spilled
    state creates under ``parent`` and :meth:`close` removes; each file is unlinked as soon as it is
    mapped (its bytes stay until the tensor is freed), so none outlives the process, even killed."""

    def __init__(self, parent: str):
        self.parent = parent
        self.dir: str | None = None
        self.files = self.bytes = self.no_room = 0

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def room(self, need: int) -> bool:
        """Is there room for ``need`` bytes of states (and a margin) on ``parent``'s disk?"""
        return os.path.isdir(self.parent) and shutil.disk_usage(self.parent).free >= need + SPILL_MARGIN

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in a new memory-mapped file (one line when the disk is full)."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix=".adatoken-spill-", dir=self.parent)
        path = os.path.join(self.dir, f"{self.files}.bin")
        self.files += 1
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # a full disk fails here, not in a page fault (macOS has no fallocate: a sparse file there)
            allocate = getattr(os, "posix_fallocate", lambda fd, _, n: os.ftruncate(fd, n))
            allocate(fd, 0, t.numel() * t.element_size())
            out = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise InputError(f"{self.parent}: no room left for the spilled states; free disk space, give "
                             "--spill another directory or --spill off") from None
        finally:
            os.close(fd)
            os.unlink(path)
        self.bytes += t.numel() * t.element_size()
        return out.view(t.shape).copy_(t)

    def store(self, ex: PrefillExecutor) -> None:
        """Move ``ex``'s hidden states, mask, query and cached keys and values to mapped files."""
        _map_state(ex, lambda t: self.tensor(t) if t.is_contiguous() and t.numel()
                   and t.untyped_storage().filename is None else t)

    def close(self) -> None:
        if self.dir is not None:
            try:
                os.rmdir(self.dir)  # its files were unlinked when mapped: only what another put there keeps it
            except OSError:
                pass
            self.dir = None


def _map_state(ex: PrefillExecutor, fn) -> None:
    for name in ("hidden", "mask4", "query"):
        t = getattr(ex, name)
        if isinstance(t, torch.Tensor):
            setattr(ex, name, fn(t))
    for tensors in (ex.cache.keys, ex.cache.values):
        for j, t in enumerate(tensors):
            if isinstance(t, torch.Tensor):
                tensors[j] = fn(t)


def spill_for(spill: str | None, out: str | None) -> Spill | None:
    """``--spill``: ``auto`` (default: beside ``--out``, or in the temporary directory without one),
    ``off``, or a directory to spill under (one line unless it exists)."""
    spill = "auto" if spill is None else str(spill)
    if spill == "off":
        return None
    if spill == "auto":
        parent = os.path.dirname(os.path.abspath(out)) if out else tempfile.gettempdir()
        return Spill(parent if os.path.isdir(parent) else tempfile.gettempdir())
    if not os.path.isdir(spill):
        raise InputError(f"--spill {spill}: not a directory; give an existing directory, auto or off")
    return Spill(os.path.abspath(spill))


# ---------------------------------------------------------------------- streamed layers
class StreamedLayers:
    """The decoder's layers (and head) on ``device`` one at a time: :meth:`on` loads a module's
    weights (from the checkpoint when ``lazy`` left them there, else a copy of the resident ones
    when the device differs) and puts the placeholders back when the block ends."""

    def __init__(self, decoder, lazy=None, device="cpu", chunk_bytes: int | None = None,
                 spill: Spill | None = None):
        self.decoder = decoder
        self.spec = spec_for(decoder)
        self.device = torch.device(device)
        self.layers = list(self.spec.layers(decoder))
        body = self.spec.body(decoder)
        self.head = (body.norm, decoder.lm_head)
        self._loaders = {id(m): (lazy.for_module(m) if lazy else {}) for m in (*self.layers, *self.head)}
        body.rotary_emb.to(self.device)  # a small buffer every layer reads
        self.chunk_bytes = chunk_bytes
        # ``spill``: where a chunk's states past the budget go instead of another pass over the weights;
        # ``resident``: while one pass serves more than the budget, the bytes of states kept in memory
        self.spill, self.resident = spill, None
        self.timings: dict = {}

    def read(self, *modules) -> list:
        """The weights of ``modules`` on the device: [(placeholder tensor, loaded value)]."""
        out = []
        for m in modules:
            loaders = self._loaders[id(m)]
            named = dict(m.named_parameters(remove_duplicate=False))
            named.update(m.named_buffers(remove_duplicate=False))
            for name, t in named.items():
                load = loaders.get(name)
                if load is None and t.device == self.device:
                    continue
                out.append((t, load().to(self.device, t.dtype) if load is not None else t.data.to(self.device)))
        return out

    @contextmanager
    def on(self, *modules, weights: list | None = None):
        """``modules`` with their weights in place (``weights``: read already, by :meth:`read`)."""
        t0 = time.perf_counter()
        saved = []
        try:
            for t, value in (weights if weights is not None else self.read(*modules)):
                saved.append((t, t.data))
                t.data = value
            self._add("load_s", time.perf_counter() - t0)
            yield
        finally:
            for t, data in reversed(saved):
                t.data = data

    def _add(self, key: str, v: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + v

    def chunks(self, items: list, size_of, held_of=None) -> list[list]:
        """``items`` in consecutive chunks whose ``size_of`` sums stay within the chunk budget
        (at least one item each), or, with a :class:`Spill` that has room for what the states of
        all of them hold between layers (``held_of``, default ``size_of``), all in one chunk whose
        states past the budget (less one item's ``size_of``, for the state that runs) are spilled."""
        self.resident = None
        if self.chunk_bytes is None:
            return [items] if items else []
        out, cur, used = [], [], 0
        for it in items:
            b = size_of(it)
            if cur and used + b > self.chunk_bytes:
                out.append(cur)
                cur, used = [], 0
            cur.append(it)
            used += b
        out += [cur] if cur else []
        if len(out) > 1 and self.spill is not None:
            need = sum(map(held_of or size_of, items))
            if self.spill.room(need):
                self.resident = max(0, self.chunk_bytes - max(map(size_of, items)))
                return [items]
            self.spill.no_room = max(self.spill.no_room, need)  # reported: the chunked passes ran instead
        return out

    def state_bytes(self, inputs) -> int:
        """About what one batch's state holds between layers and while a layer runs on it: the
        hidden states, a layer's keys and values, the MLP's intermediate activations, the rotary
        tables and the attention scores of one layer."""
        cfg = self.decoder.config
        B, T = inputs.inputs_embeds.shape[:2]
        item = torch.empty((), dtype=next(self.decoder.parameters()).dtype).element_size()
        H, inter = int(cfg.hidden_size), int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
        heads = int(cfg.num_attention_heads)
        return int(B * T * ((6 * H + 3 * inter) * item + 2 * (H // heads) * 4 + heads * T * 4))

    def branch_bytes(self, inputs) -> int:
        """About what one more state of a batch holds between layers: its hidden states, one
        layer's keys and the boolean mask."""
        B, T = inputs.inputs_embeds.shape[:2]
        item = torch.empty((), dtype=next(self.decoder.parameters()).dtype).element_size()
        return int(B * T * (2 * int(self.decoder.config.hidden_size) * item + T))

    def run(self, states, step, phase: str, head: bool = False, start: int = 0) -> list | None:
        """Every layer from ``start`` on over every state of ``states`` (a list, or a function of the
        layer index giving the states that run it): ``step(state, i)`` runs layer ``i`` on one. The
        next layer's weights are read while a layer runs (``load_s`` counts only the wait; each read
        adds one to ``{phase}_layer_reads``); ``head``: the head's too, returned for :meth:`logits`."""
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(self.read, self.layers[start])
            for i, layer in enumerate(self.layers):
                if i < start:
                    continue
                t0 = time.perf_counter()
                weights = ahead.result()
                self._add("load_s", time.perf_counter() - t0)
                self._add(f"{phase}_layer_reads", 1)
                nxt = self.layers[i + 1:i + 2] or (self.head if head else ())
                ahead = reader.submit(self.read, *nxt)
                now = states(i) if callable(states) else states
                with self.on(layer, weights=weights):
                    t0 = time.perf_counter()
                    held = 0
                    for st in now:
                        ex = _executor(st)
                        if self.device.type != "cpu":  # a spilled state runs from the device
                            _map_state(ex, lambda t: t.to(self.device))
                        step(st, i)
                        if self.resident is not None:
                            size = ex.nbytes()
                            if held + size > self.resident:
                                self.spill.store(ex)
                            else:
                                held += size
                    self._add(f"{phase}_s", time.perf_counter() - t0)
                    self._add(f"{phase}_sample_layers", sum(_rows(st) for st in now))
                del weights
            return ahead.result() if head else None

    def logits(self, executors: list, weights: list | None = None) -> list[torch.Tensor]:
        """The head over the states after the last layer (``weights``: read by :meth:`run`)."""
        with self.on(*self.head, weights=weights):
            return [ex.logits().float().cpu() for ex in executors]

    def summary(self) -> dict:
        """Seconds spent reading weights and running layers, per phase, and per row and layer; how
        many layers each phase read (the number of layers per pass over the weights); the bytes of
        states spilled to memory-mapped files."""
        out = {k: round(v, 3) for k, v in self.timings.items() if k.endswith("_s")}
        if self.spill is not None and self.spill.bytes:
            out["spilled_bytes"] = int(self.spill.bytes)
        if self.spill is not None and self.spill.no_room:
            out["spill_no_room"] = f"{self.spill.parent}: no room for {_gb(self.spill.no_room)} of states; chunked"
        for phase in ("statistics", "references", "validation"):
            n = self.timings.get(f"{phase}_sample_layers")
            if n:
                out[f"{phase}_sample_layers"] = int(n)
                out[f"{phase}_layer_reads"] = int(self.timings[f"{phase}_layer_reads"])
                out[f"{phase}_s_per_sample_layer"] = round(self.timings[f"{phase}_s"] / n, 4)
        return out


def _executor(state) -> PrefillExecutor:
    return state[0] if isinstance(state, tuple) else state


def _rows(state) -> int:
    return int(_executor(state).hidden.shape[0])


# ---------------------------------------------------------------------- statistics
@torch.no_grad()
def observe(layers: StreamedLayers, obs, batches: list) -> None:
    """Accumulate ``obs``'s statistics over ``batches`` ((DecoderInputs, answers) pairs) layer by
    layer: per chunk, plan every batch, run each layer over all of them, then finish them."""
    for chunk in layers.chunks(list(batches), lambda ba: layers.state_bytes(ba[0]),
                               lambda ba: layers.branch_bytes(ba[0])):
        states = []
        for batch, ans in chunk:
            ext, pl = obs.plan(batch, ans)
            ex = PrefillExecutor(obs.decoder, ext, materialize_mask=False, spec=obs.spec, keep_kv=False,
                                 device=layers.device)
            states.append((ex, functools.partial(obs.on_layer, pl), pl))
        layers.run(states, lambda st, i: st[0].layer(on_layer=st[1]), "statistics")
        for _, _, pl in states:
            obs.finish(pl)


# ---------------------------------------------------------------------- validation
class _Node:
    """A node of :func:`tree_logits`' prefix tree: the batches' states and the schedules that share
    them (the same cuts so far)."""

    def __init__(self, exs: list, members: list[int]):
        self.exs, self.members, self.cut, self.observe = exs, members, None, False


@torch.no_grad()
def tree_logits(layers: StreamedLayers, batches: list, schedules: list, phase: str = "validation", *,
                start: tuple | None = None, keep: list | None = None) -> list[list]:
    """Next-token logits (float32, CPU) of each batch under each of ``schedules`` (pruned, or
    unpruned for None or a schedule without cuts; a list per schedule), all in one pass over the
    layers: the schedules that make the same cuts up to a layer share one state per batch, which
    branches (a copy per distinct cut) where their cuts first differ, each branch then carrying its
    own pruned state. For the schedules with cuts: ``start``: (layer f, the batches'
    :meth:`PrefillExecutor.stored` states before layer f, where none of them cuts yet) to run from;
    ``keep``: a list that receives the states before their shallowest first cut."""
    cuts = [{c.layer: c for c in s.effective_cuts()} if s is not None else {} for s in schedules]
    pruned = [k for k, c in enumerate(cuts) if c]
    first = min((min(cuts[k]) for k in pruned), default=None)
    nodes = []
    if len(pruned) < len(schedules):  # the unpruned model, as its own prefill runs it
        nodes.append(_Node([PrefillExecutor(layers.decoder, b, materialize_mask=False, spec=layers.spec,
                                            keep_kv=False, device=layers.device) for b in batches],
                           [k for k, c in enumerate(cuts) if not c]))
    if pruned:
        exs = [st.resume() for st in start[1]] if start is not None else [
            PrefillExecutor(layers.decoder, b, materialize_mask=True, spec=layers.spec, keep_kv=True,
                            device=layers.device) for b in batches]
        nodes.append(_Node(exs, pruned))

    def at(i: int) -> list:
        """The states that run layer ``i``: each node there split by its schedules' cuts before it."""
        for node in [n for n in nodes if n.exs[0].next_layer == i]:
            if keep is not None and i == first and node.members == pruned:
                keep.extend(ex.stored() for ex in node.exs)
            groups: dict = {}
            for k in node.members:
                c = cuts[k].get(i)
                groups.setdefault(None if c is None else (c.keep, c.rule), []).append(k)
            parts = list(groups.values())
            node.members = parts[0]
            for part in parts[1:]:
                nodes.append(_Node([ex.branch() for ex in node.exs], part))
        for node in nodes:
            if node.exs[0].next_layer == i:
                node.cut = cuts[node.members[0]].get(i)
                # record the query where a later cut ranks by attention (or the stored states may)
                node.observe = any(c.get(i + 1) is not None and "attention" in c[i + 1].rule.needs()
                                   for c in (cuts[k] for k in node.members)) or (
                    keep is not None and first is not None and i < first and node.members == pruned)
        return [(ex, node) for node in nodes if node.exs[0].next_layer == i for ex in node.exs]

    def step(st, i: int) -> None:
        ex, node = st
        if node.cut is not None:
            ex.cut(node.cut)
        ex.layer(observe=node.observe)
        # a cut reads the keys of the layer before it, nothing older, and never the values
        ex.cache.values[i] = None
        if i:
            ex.cache.keys[i - 1] = None

    begin = min(n.exs[0].next_layer for n in nodes)
    head = layers.run(at, step, phase, head=True, start=begin)
    logits = layers.logits([ex for n in nodes for ex in n.exs], head)
    out: list = [None] * len(schedules)
    for j, node in enumerate(nodes):
        for k in node.members:
            out[k] = logits[j * len(batches):(j + 1) * len(batches)]
    return out


class LayeredValidation:
    """Mixin body of :func:`validation_cache`: the solver's ValidationCache running layer-major.

    Candidates share the unpruned layers before their first cut: per chunk of held-back batches the
    states before the shallowest first cut run so far are kept (within the cache's prefix budget),
    and a candidate whose first cut is there or deeper starts from them (the sample-major engine's
    states after layer 0, taken as deep as the candidates allow). The candidates of one round
    (:meth:`measure_all`) run together, as a prefix tree (:func:`tree_logits`): one pass over the
    layers per chunk for the whole round."""

    layers: StreamedLayers

    def references(self, decoder, holdout) -> list:
        out = []
        for chunk in self.layers.chunks(list(holdout), self.layers.state_bytes, self.layers.branch_bytes):
            out += tree_logits(self.layers, chunk, [None], "references")[0]
        return out

    def _prefix(self, chunk: tuple, first: int | None):
        """(the stored states of ``chunk`` to start from, or None; a list to keep them in, or None)
        for candidates whose shallowest first cut is at layer ``first``."""
        if first is None or first < 1:
            return None, None
        prefixes = self.__dict__.setdefault("_prefixes", {})
        if prefixes.get("key") != self.key:  # another held-back set: the states are not its
            prefixes.clear()
            prefixes["key"] = self.key
        have = prefixes.get(chunk)
        return (have, None) if have is not None and have[0] <= first else (None, [])

    def _keep(self, chunk: tuple, first: int, keep: list) -> None:
        prefixes = self._prefixes
        size = sum(st.nbytes() for st in keep)
        used = sum(sum(st.nbytes() for st in v[1]) for k, v in prefixes.items() if k not in ("key", chunk))
        if used + size <= self.prefix_bytes:
            prefixes[chunk] = (first, keep)

    def _chunk_logits(self, chunk: tuple, batches: list, schedules: list) -> list[list]:
        firsts = [min(c.layer for c in s.effective_cuts()) for s in schedules if s.effective_cuts()]
        first = min(firsts) if len(firsts) == len(schedules) else None
        start, keep = self._prefix(chunk, first)
        out = tree_logits(self.layers, batches, schedules, start=start, keep=keep)
        if keep:
            self._keep(chunk, first, keep)
        return out

    def _chunks(self, holdout, n_states: int = 1) -> list[tuple]:
        """The held-back batches' indices in chunks, each batch holding ``n_states`` states at once
        (the candidates of a round, pruned ones smaller: budgeted at the hidden states and mask)."""
        lay = self.layers

        def size(i: int) -> int:
            return lay.state_bytes(holdout[i]) + (n_states - 1) * lay.branch_bytes(holdout[i])

        return [tuple(c) for c in lay.chunks(list(range(len(holdout))), size,
                                             lambda i: n_states * lay.branch_bytes(holdout[i]))]

    def _measurements(self, holdout, refs, schedules: list, max_disagree, against) -> list[dict]:
        """The agreements of ``schedules`` run together, chunk by chunk: one pass over the layers per
        chunk for all of them (:func:`tree_logits`), a schedule leaving the tree at the chunk where
        its count stops (``max_disagree``, ``against``: as in the solver's ``agreement``)."""
        from adatoken_compile.calibration.solver import _Tally, score

        tallies = [_Tally(sum(b.batch_size for b in holdout), max_disagree, against) for _ in schedules]
        active = list(range(len(schedules)))
        for chunk in self._chunks(holdout, len(schedules)):
            outs = self._chunk_logits(chunk, [holdout[i] for i in chunk], [schedules[k] for k in active])
            for k, lgs in zip(list(active), outs):
                for i, lg in zip(chunk, lgs):
                    if tallies[k].add(*score(lg, refs[i])):
                        active.remove(k)
                        break
            if not active:
                break
        return [t.measurement() for t in tallies]

    def agreement(self, decoder, holdout, refs, schedule, max_disagree, against=None):
        return self._measurements(holdout, refs, [schedule], max_disagree, against)[0]

    def measure_all(self, decoder, holdout, schedules: list, max_disagree: int | None = None, against=None,
                    until=None) -> list:
        """The solver's ``measure_all`` with the schedules not measured yet run together
        (:meth:`_measurements`): the same measurements as one by one; those after the first that
        satisfies ``until`` are made and kept too."""
        from adatoken_compile.calibration.solver import _key, _until

        todo = {_key(sch): sch for sch in schedules if self._stale(_key(sch), max_disagree)}
        if todo:
            refs = self.refs_for(decoder, holdout)
            self.measured.update(zip(todo, self._measurements(holdout, refs, list(todo.values()), max_disagree,
                                                              against)))
        return _until((dict(self.measured[_key(sch)]) for sch in schedules), until)

    def measure_at_cut(self, decoder, holdout, schedules: list, layer: int, max_disagree: int | None = None,
                       against=None) -> list:
        # the rules of one cut are one round: they branch at ``layer`` in the prefix tree
        return self.measure_all(decoder, holdout, schedules, max_disagree, against)


def validation_cache(layers: StreamedLayers):
    """A ``solver.ValidationCache`` whose references and candidates run through ``layers``."""
    from adatoken_compile.calibration.solver import ValidationCache

    cls = type("LayeredValidationCache", (LayeredValidation, ValidationCache), {})
    cache = cls()
    cache.layers = layers
    return cache
