"""The decode loop's two forms, one step at a time, each counting what crosses the session boundary.

* :class:`BufferedSteps` (decode graphs with ``past_length.{i}`` inputs): after the prefill, each
  layer's valid (kept, unpadded) positions are compacted once to the front of a buffer of
  ``max kept length over the batch + steps`` slots, placed on the session's device as an
  ``OrtValue`` and bound with IO binding as both ``past_key.{i}`` and ``present_key.{i}``
  (likewise value): onnxruntime's GroupQueryAttention writes each new position in place. Per step
  only the new token's embedding, its position and the per-layer valid lengths go in, and only
  the logits come back (into a preallocated host buffer).
  With ``bind=False`` the same graph runs on numpy buffers fed and fetched every step (the cost
  IO binding saves, measured on the same graph).
* :class:`ConcatSteps` (older artifacts: ``past_mask.{i}`` inputs): every cache goes in as numpy
  and comes back one position longer.

``kv_bytes`` / ``logits_bytes``: bytes of KV cache (keys, values, masks) and of logits copied
across the boundary by the steps run so far.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import device_of, input_dtype


def is_buffered(session) -> bool:
    return "past_length.0" in {i.name for i in session.get_inputs()}


def _types(values) -> dict:
    return {v.name: input_dtype(v.type) for v in values}


class ConcatSteps:
    """Decode steps that pass every cache in and get it back concatenated (numpy)."""

    def __init__(self, session, prefill_out: dict, num_layers: int):
        self.s = session
        self.types = _types(session.get_inputs())
        self.past = {}
        for i in range(num_layers):
            self.past[f"past_key.{i}"] = prefill_out[f"key.{i}"]
            self.past[f"past_value.{i}"] = prefill_out[f"value.{i}"]
            self.past[f"past_mask.{i}"] = prefill_out[f"mask.{i}"].astype(bool)
        self.kv_bytes = self.logits_bytes = 0
        self.steps = 0

    def step(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"inputs_embeds": embeds.astype(self.types["inputs_embeds"] or embeds.dtype, copy=False),
                 "position_ids": positions}
        for k, v in self.past.items():
            t = self.types.get(k)
            feeds[k] = v.astype(t, copy=False) if t is not None and v.dtype != t else v
        names = [o.name for o in self.s.get_outputs()]
        res = dict(zip(names, self.s.run(None, feeds)))
        self.past = {k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
        self.kv_bytes += sum(feeds[k].nbytes for k in self.past) + sum(v.nbytes for v in self.past.values())
        self.logits_bytes += res["logits"].nbytes
        self.steps += 1
        return res["logits"]


class BufferedSteps:
    """Decode steps over per-layer buffers that stay on the session's device (see module docstring)."""

    def __init__(self, session, prefill_out: dict, num_layers: int, steps: int, bind: bool = True):
        self.s = session
        self.bind = bind
        types = _types(session.get_inputs())
        self.embed_type = types["inputs_embeds"]
        device, dev_id = device_of(session)
        B = prefill_out["logits"].shape[0]
        self.io = session.io_binding()
        self.lengths = []
        self.buffers = []  # kept alive while bound
        for i in range(num_layers):
            mask = np.asarray(prefill_out[f"mask.{i}"], bool)
            n = mask.sum(1)
            cap = int(n.max()) + max(int(steps), 1)
            for kind in ("key", "value"):
                src = prefill_out[f"{kind}.{i}"]
                Bk, H, _, D = src.shape
                buf = np.zeros((B, H, cap, D), types[f"past_{kind}.{i}"] or src.dtype)
                for b in range(B):  # left padding and pruned slots out: row b's kept positions from slot 0
                    buf[b, :, : n[b]] = src[b][:, mask[b]]
                if bind:
                    v = ort.OrtValue.ortvalue_from_numpy(buf, device, dev_id)
                    self.io.bind_ortvalue_input(f"past_{kind}.{i}", v)
                    self.io.bind_ortvalue_output(f"present_{kind}.{i}", v)
                    self.buffers.append(v)
                else:
                    self.buffers.append(buf)
            self.lengths.append(n.astype(np.int32))
        out = {o.name: o for o in session.get_outputs()}
        ltype = input_dtype(out["logits"].type) or np.float32
        self.logits = np.empty((B, prefill_out["logits"].shape[-1]), ltype)
        # the host array itself is the output: ORT writes (or copies from the device) the logits there
        self.io.bind_output("logits", "cpu", 0, ltype, list(self.logits.shape), self.logits.ctypes.data)
        self._bound, self._bound_values = {}, {}  # host inputs bound once (see _host)
        if bind:  # each layer's valid length: bound once, advanced in place after every step
            self.lengths = [self._host(f"past_length.{i}", n) for i, n in enumerate(self.lengths)]
        self.kv_bytes = self.logits_bytes = 0
        self.steps = 0

    @property
    def capacities(self) -> list[int]:
        return [int(v.shape[2] if isinstance(v, np.ndarray) else v.shape()[2]) for v in self.buffers[0::2]]

    def _host(self, name: str, value: np.ndarray) -> np.ndarray:
        """The host array bound once as input ``name`` (an OrtValue over its memory, which the step
        then rewrites in place: no binding per step); rebound if the shape or dtype changes."""
        have = self._bound.get(name)
        if have is None or have.shape != value.shape or have.dtype != value.dtype:
            have = np.array(value, order="C")
            self._bound[name] = have
            self._bound_values[name] = v = ort.OrtValue.ortvalue_from_numpy(have)
            self.io.bind_ortvalue_input(name, v)
        else:
            have[...] = value
        return have

    def step(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if not self.bind:
            return self._numpy_step(embeds, positions)
        self._host("inputs_embeds", np.asarray(embeds, self.embed_type or embeds.dtype))
        self._host("position_ids", np.asarray(positions, np.int64))
        self.s.run_with_iobinding(self.io)
        for n in self.lengths:
            n += 1
        self.logits_bytes += self.logits.nbytes
        self.steps += 1
        return self.logits.copy()

    def _numpy_step(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, self.embed_type or embeds.dtype),
                 "position_ids": np.ascontiguousarray(positions, np.int64)}
        for i, n in enumerate(self.lengths):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = self.buffers[2 * i], self.buffers[2 * i + 1]
            feeds[f"past_length.{i}"] = n
        names = [o.name for o in self.s.get_outputs()]
        res = dict(zip(names, self.s.run(None, feeds)))
        self.buffers = [res[f"present_{k}.{i}"] for i in range(len(self.lengths)) for k in ("key", "value")]
        self.kv_bytes += 2 * sum(b.nbytes for b in self.buffers)
        self.lengths = [n + 1 for n in self.lengths]
        self.logits_bytes += res["logits"].nbytes
        self.steps += 1
        return res["logits"]
