"""The exporter writes the same bytes for the same graph wherever the traced code lives."""

from __future__ import annotations

import hashlib
import importlib.util

import onnx
import torch

from adatoken_compile.compiler.export import SOURCE_METADATA, export

SOURCE = '''
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.proj(x)).sum(-1)
'''


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Tiny()


def test_two_checkouts_write_byte_identical_graphs(tmp_path):
    """The same module from two folders, imported under two names, its lines shifted in one, exports
    to files of one sha256, and no node keeps a file path or a source line."""
    paths = []
    for i, (where, pad) in enumerate([("checkout-a", ""), ("elsewhere/checkout-b", "\n\n\n# moved down\n")]):
        src = tmp_path / where / "tiny_module.py"
        src.parent.mkdir(parents=True)
        src.write_text(pad + SOURCE)
        out = tmp_path / f"out{i}" / "tiny.onnx"
        export(_load(str(src), f"tiny_module_{i}"), (torch.randn(2, 8),), None, str(out), ["x"], ["y"])
        paths.append(out)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digests[0] == digests[1]
    model = onnx.load(str(paths[0]))
    assert model.graph.node
    for node in model.graph.node:
        keys = {p.key for p in node.metadata_props}
        assert not keys & set(SOURCE_METADATA), keys
        assert "pkg.torch.onnx.name_scopes" in keys  # what names the token-drop nodes stays
        for p in node.metadata_props:
            assert str(tmp_path) not in p.value and "line " not in p.value, (p.key, p.value)
