"""ONNX Runtime sessions: execution-provider choice and session options."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import InputError, first_line

# ONNX Runtime's own log lines (warnings about a graph or its external data) would follow the tool's
# one-line error; only its errors are shown, as the sessions' log_severity_level does per session
ort.set_default_logger_severity(3)

# OpenVINO (onnxruntime-openvino, which replaces onnxruntime) in float32: its CPU default may
# compute in bfloat16, which changes the scores a cut ranks by; nodes it lacks run on the CPU provider
OPENVINO = ("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "FP32"})
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "openvino": [OPENVINO, "CPUExecutionProvider"]}
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def input_dtype(ort_type: str):
    """The numpy dtype of a floating-point ORT input type string (``tensor(float16)``); None for others."""
    return _ORT_TYPES.get(ort_type)


def cuda_available() -> bool:
    """onnxruntime-gpu installed and a GPU not hidden by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() not in ("", "-1")
    return "CUDAExecutionProvider" in ort.get_available_providers() and visible


def choose_providers(providers: Sequence[str] | str | None = None) -> list[str]:
    """Execution providers for a session.

    ``None`` or ``"auto"``: CUDA when available, else CPU. ``"cpu"`` / ``"cuda"`` / ``"openvino"``:
    that one (a one-line error when its provider is not installed or, for CUDA, no GPU is
    visible). A list is used as given.
    """
    if providers is None or providers == "auto":
        return PROVIDERS["cuda"] if cuda_available() else PROVIDERS["cpu"]
    if isinstance(providers, str):
        if providers not in PROVIDERS:
            raise InputError(f"--provider {providers!r}: choose cpu, cuda, openvino or auto")
        if providers == "openvino" and OPENVINO[0] not in ort.get_available_providers():
            raise InputError("--provider openvino: the OpenVINO execution provider is not available (install "
                             "onnxruntime-openvino in place of onnxruntime, in its own environment), or use --provider cpu")
        if providers == "cuda" and not cuda_available():
            raise InputError("--provider cuda: the CUDA execution provider is not available (install onnxruntime-gpu "
                             "in place of onnxruntime and make a GPU visible), or use --provider cpu")
        return list(PROVIDERS[providers])
    return list(providers)


def on_local_device(providers: Sequence) -> list:
    """Under torchrun (``LOCAL_RANK`` set) the CUDA provider runs on the process's own GPU of its node."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return list(providers)
    return [(p, {"device_id": int(local)}) if p == "CUDAExecutionProvider" else p for p in providers]


def make_session(onnx_path: str, providers: Sequence[str] = ("CPUExecutionProvider",), *, threads: int | None = None,
                 profile_prefix: str | None = None, optimized_model_filepath: str | None = None, level: str = "all",
                 spin: bool = True):
    """An ORT session (ORT_ENABLE_ALL by default); ``threads`` sets intra-op threads (inter-op 1).
    ``spin=False``: the session's worker threads sleep as soon as a parallel section ends instead of
    spin-waiting for the next (see :func:`open_session`)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = optimized_model_filepath
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=on_local_device(providers))


def open_session(path: str, providers: list[str], recompile_hint: str, threads: int | None = None,
                 spin: bool = True):
    """A session for one artifact graph; a CUDA session that fails to start falls back to CPU.

    Each graph has its own session and intra-op thread pool. ``spin=False`` for the graphs that run
    once per request (encoder, projector, prefill): their workers would otherwise spin-wait after
    the prefill on the cores the decode session's threads need, and the first decode steps ran up
    to a third slower on 2 cores (``python scripts/bench_peers.py``). The decode step, run back to
    back, keeps ONNX Runtime's default spinning."""
    try:
        sess = make_session(path, providers, threads=threads, spin=spin)
    except Exception as e:
        if providers == PROVIDERS["cpu"]:
            raise InputError(f"{path}: ONNX Runtime could not load the graph ({type(e).__name__}: {first_line(e)}); "
                             f"{recompile_hint}") from None
        sess = open_session(path, PROVIDERS["cpu"], recompile_hint, threads, spin)  # e.g. CUDA libraries missing
    return sess if isinstance(sess, CheckedSession) else CheckedSession(sess, path, recompile_hint)


# encoder outputs that must be finite: NaN spatial tokens answer garbage silently (the logits are
# checked where every token is picked, adatoken_compile.runtime.sampling.next_tokens)
_FINITE_OUTPUTS = {"features": "the encoder's features", "tokens": "the spatial tokens"}


class CheckedSession:
    """An ORT session whose failures are one-line InputErrors naming the graph, and whose encoder
    outputs are checked to be finite (NaN or inf there is refused, never answered)."""

    def __init__(self, session, path: str, recompile_hint: str):
        self._s, self.path, self.hint = session, path, recompile_hint

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run(self, output_names, feeds, *args, **kwargs):
        try:
            outs = self._s.run(output_names, feeds, *args, **kwargs)
        except Exception as e:  # onnxruntime's own error types (invalid argument, runtime failure)
            raise InputError(f"{self.path}: ONNX Runtime failed ({type(e).__name__}: {first_line(e)}); the inputs do not "
                             f"fit this graph, or {self.hint}") from None
        names = output_names or [o.name for o in self._s.get_outputs()]
        for name, value in zip(names, outs):
            what = _FINITE_OUTPUTS.get(name)
            if what and isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InputError(f"{self.path}: {what} came out NaN or inf; the input is out of range for this model "
                                 "(check the scene's or image's values), or its weights are not finite")
        return outs

    def run_with_iobinding(self, binding, *args, **kwargs):
        try:
            return self._s.run_with_iobinding(binding, *args, **kwargs)
        except Exception as e:  # as run: the graph's failure, in one line
            raise InputError(f"{self.path}: ONNX Runtime failed ({type(e).__name__}: {first_line(e)}); the inputs do not "
                             f"fit this graph, or {self.hint}") from None


def device_of(session) -> tuple[str, int]:
    """Where a session computes: ``("cuda", device id)`` on the CUDA provider, else ``("cpu", 0)``."""
    if session.get_providers()[0] == "CUDAExecutionProvider":
        opts = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(opts.get("device_id", 0))
    return "cpu", 0


def check_graph_io(sessions: dict, input_kind: str, num_layers: int, num_cuts: int, art: str, hint: str,
                   coords: bool = False, encoder_inputs=None) -> None:
    """Refuse, at load, an artifact whose graphs are not the ones the runtime drives: each graph the
    input kind needs is present, takes only the feeds the runtime gives it and returns what it
    reads back (names fixed by the compiler). ``coords``: the schedule's rules read the spatial
    tokens' coordinates, so the prefill may take them (``spatial_xyz``). ``encoder_inputs``: what
    the image encoder takes when the image processing says (default: ``pixel_values``)."""
    need = {"prefill": ({"inputs_embeds", "attention_mask", "position_ids", "spatial_mask"}
                        | ({"spatial_xyz"} if coords else set()),
                        {"logits", *(f"{k}.{i}" for k in ("key", "value", "mask") for i in range(num_layers)),
                         *(f"kept.{c}" for c in range(num_cuts))}),
            "encoder": ({"pixel_values", "xyz"} if input_kind == "scene" else set(encoder_inputs or ["pixel_values"]),
                        {"features"})}
    if input_kind == "scene":
        need["projector"] = ({"features"}, {"tokens"})
    if "decode" in sessions:
        # two forms: caches concatenated per step (past/present key, value, mask), or in-place
        # buffers (past key, value, length in; present key, value out)
        buffered = "past_length.0" in {i.name for i in sessions["decode"].get_inputs()}
        kinds = ("key", "value", "length") if buffered else ("key", "value", "mask")
        past = {f"past_{k}.{i}" for k in kinds for i in range(num_layers)}
        need["decode"] = ({"inputs_embeds", "position_ids", *past},
                          {"logits", *(f"present_{k}.{i}" for k in kinds[:2 if buffered else 3] for i in range(num_layers))})
    for name, (feeds, outs) in need.items():
        if name not in sessions:
            raise InputError(f"{art}: the artifact has no '{name}' graph, which a {input_kind} model needs; {hint}")
        s = sessions[name]
        ins = {i.name for i in s.get_inputs()}
        got = {o.name for o in s.get_outputs()}
        extra, missing = sorted(ins - feeds), sorted(outs - got)
        if extra or missing:
            what = f"takes input '{extra[0]}'" if extra else f"lacks output '{missing[0]}'"
            raise InputError(f"{s.path}: graph '{name}' {what}, not what this runtime drives; {hint}")
