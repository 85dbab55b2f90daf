"""ONNX Runtime sessions: execution-provider choice and session options."""

from __future__ import annotations

import os
from typing import Sequence

import onnxruntime as ort

from ..errors import InputError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def cuda_available() -> bool:
    """onnxruntime-gpu installed and a GPU not hidden by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() not in ("", "-1")
    return "CUDAExecutionProvider" in ort.get_available_providers() and visible


def choose_providers(providers: Sequence[str] | str | None = None) -> list[str]:
    """Execution providers for a session.

    ``None`` or ``"auto"``: CUDA when available, else CPU. ``"cpu"`` / ``"cuda"``: that one
    (``"cuda"`` is a one-line error when CUDA is not available). A list is used as given.
    """
    if providers is None or providers == "auto":
        return PROVIDERS["cuda"] if cuda_available() else PROVIDERS["cpu"]
    if isinstance(providers, str):
        if providers not in PROVIDERS:
            raise InputError(f"--provider {providers!r}: choose cpu, cuda or auto")
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
                 profile_prefix: str | None = None, optimized_model_filepath: str | None = None, level: str = "all"):
    """An ORT session (ORT_ENABLE_ALL by default); ``threads`` sets intra-op threads (inter-op 1)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
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


def open_session(path: str, providers: list[str], recompile_hint: str, threads: int | None = None):
    """A session for one artifact graph; a CUDA session that fails to start falls back to CPU."""
    try:
        return make_session(path, providers, threads=threads)
    except Exception as e:
        if providers != PROVIDERS["cpu"]:  # e.g. CUDA libraries missing
            return make_session(path, threads=threads)
        raise InputError(f"{path}: ONNX Runtime could not load the graph ({type(e).__name__}: {str(e)[:200]}); "
                         f"{recompile_hint}")
