"""What a result depends on besides its inputs: library versions and thread settings.

Recorded in every schedule, report and results file, so that two figures can be compared only
when they were measured under the same conditions (torch-free: reads installed metadata, and
torch's thread count only when torch is already imported).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys

from adatoken_compile import __version__, distributed

_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def library_versions() -> dict:
    """Versions of this package and of the libraries whose numerics a result depends on."""
    out = {"adatoken_compile": __version__, "python": platform.python_version()}
    for pkg in _LIBRARIES:
        for dist in (pkg, pkg + "-gpu") if pkg == "onnxruntime" else (pkg,):
            try:
                out[pkg] = md.version(dist)
                break
            except md.PackageNotFoundError:
                out[pkg] = None
    return out


def thread_settings() -> dict:
    """torch's intra-op thread count (when torch is loaded) and the thread environment variables."""
    torch = sys.modules.get("torch")
    out = {"torch_threads": torch.get_num_threads() if torch is not None else None, "cpu_count": os.cpu_count()}
    out.update({v: os.environ.get(v) for v in _THREAD_VARS})
    return out


def environment() -> dict:
    """Versions, thread settings, and the number of processes that shared the work (torchrun)."""
    return {"versions": library_versions(), "threads": thread_settings(), "world_size": distributed.world()}
