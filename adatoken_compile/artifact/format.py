"""The artifact directory format: names, the manifest, file hashes (numpy-free, torch-free).

Layout of ``ART/`` (every file but the manifest is hashed in ``manifest.json``)::

    manifest.json            format "adatoken-compile/artifact" v1: graphs + I/O, schedule, model,
                             library versions, sha256 + size of every other file, created_at
    encoder.onnx[.data]      the model's encoder graph(s), as its export configuration declares
    projector.onnx[.data]    (LLaVA-3D: pixel_values, xyz -> features; features -> tokens)
    prefill.onnx[.data]      capture -> token-drop pass -> ONNX (inputs_embeds, attention_mask,
                             position_ids, spatial_mask -> logits, key/value/mask.{i}, kept.{c})
    decode.onnx[.data]       one decode step over per-layer caches
    embed_tokens.npy         (vocab, H) input embeddings (text ids are embedded in numpy)
    tokenizer/               tokenizer.json + tokenizer_config.json
    preprocess.json          image / voxel / prompt settings the runtime needs
    schedule.json            the schedule compiled in

The manifest's own sha256 is the artifact's digest: ``compile`` prints it, and ``load`` /
``run`` can be given it to detect a manifest rewritten (and re-hashed) after compilation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

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
    digest: str | None = None  # "sha256:<hex>" of manifest.json as read

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def files(self) -> dict:
        return self.data["files"]

    @property
    def family(self) -> str:
        return self.data["model"]["family"]

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    def graph_bytes(self, name: str) -> int:
        """Size of a graph: its .onnx file plus its external-data files."""
        g = self.graphs[name]
        return sum(self.files[f]["size"] for f in [g["file"], *g.get("external_data", [])])

    def to_dict(self) -> dict:
        return self.data


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file (the form artifact digests are printed in)."""
    return "sha256:" + sha256_file(path)


def file_table(root: str) -> dict:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root`` except the manifest (and
    the writer's own bookkeeping files, named ``.adatoken-compile-*``)."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST or fn.startswith(".adatoken-compile-"):
                continue
            files[rel] = {"sha256": sha256_file(full), "size": os.path.getsize(full)}
    return files
