"""Packaging: the wheel's contents, and the runtime install tier working without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_DEPS_IMPORTS = ("numpy", "onnxruntime", "tokenizers", "PIL", "click", "tqdm")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    (whl,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    return str(out / whl)


def test_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"adatoken_compile"}, tops
    assert "adatoken_compile/passes/token_drop.py" in names or "adatoken_compile/passes/token_drop/__init__.py" in names
    assert "adatoken_compile/models/llava3d_tiny/model.safetensors" in names
    assert not any(n.startswith("reference_model/") or "/train" in n for n in names)


def test_runtime_tier_runs_an_artifact_without_torch(wheel, tiny_artifact, scene_file, tmp_path):
    """A fresh virtual environment with the base install only (no torch, transformers or onnx)
    loads an artifact built here and answers as the full install does."""
    art = tiny_artifact[0]
    args = ["run", "--artifact", art, "--scene", scene_file, "-q", "what is in the room?", "--max-new-tokens", "6"]
    want = subprocess.run([sys.executable, "-m", "adatoken_compile", *args], capture_output=True, text=True, check=True)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # without PYTHONPATH: a checkout on it (with the egg-info a build leaves there) reads as installed
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    inst = subprocess.run([py, "-m", "pip", "install", "-q", wheel], capture_output=True, text=True, env=clean)
    if inst.returncode != 0 and "Could not find a version" in inst.stderr + inst.stdout:
        pytest.skip("the package registry is not reachable for the runtime dependencies")
    assert inst.returncode == 0, inst.stderr[-2000:]
    for mod in ("torch", "transformers", "onnx", "matplotlib"):
        r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True, env=clean, cwd=tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"{mod} is importable in the runtime tier"
    r = subprocess.run([py, "-c", "import " + ", ".join(RUNTIME_DEPS_IMPORTS)], env=clean, cwd=tmp_path)
    assert r.returncode == 0
    got = subprocess.run([str(env_dir / "bin" / "adatoken-compile"), *args], capture_output=True, text=True, env=clean,
                         cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout
    assert "answer:" in got.stdout
