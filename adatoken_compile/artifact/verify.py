"""Verify an artifact directory before anything in it is opened: format, paths, sizes, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import re

from ..errors import InputError
from ..readers import MAX_JSON_BYTES, Fields, read_bytes
from ..schedule import Schedule
from .format import FORMAT, MANIFEST, VERSION, Manifest, sha256_file

RECOMPILE = "recompile it with `adatoken-compile compile`"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def inside(root_real: str, rel: str, art: str, what: str) -> str:
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


def _read_manifest(art_dir: str, mpath: str) -> tuple[dict, str]:
    raw = read_bytes(mpath, "manifest", RECOMPILE, MAX_JSON_BYTES)  # a regular file of bounded size, first
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise InputError(f"{mpath}: manifest JSON nested too deeply; {RECOMPILE}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{mpath}: unreadable manifest ({type(e).__name__}); {RECOMPILE}")
    except OSError as e:
        raise InputError(f"{mpath}: cannot read the manifest ({e.strerror}); {RECOMPILE}")
    return data, "sha256:" + hashlib.sha256(raw).hexdigest()


def _onnx_external_locations(path: str) -> list[str] | None:
    """External-data locations an ONNX file references, when the optional ``onnx`` package is
    installed (a second line of defence behind the hashes; the runtime tier does not need it)."""
    try:
        import onnx  # optional: not part of the runtime install
    except ImportError:
        return None
    m = onnx.load(path, load_external_data=False)
    locs: list[str] = []

    def tensor(t):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locs.extend(e.value for e in t.external_data if e.key == "location" and e.value not in locs)

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                if a.HasField("g"):
                    graph(a.g)
                for sg in a.graphs:
                    graph(sg)

    graph(m.graph)
    return locs


def verify(art_dir: str, *, check_hashes: bool = True, expected_digest: str | None = None) -> Manifest:
    """Check format/version, that every path stays inside ART, and every file's size and sha256.

    ``expected_digest`` (``sha256:<hex>`` as ``compile`` prints it): refuse an artifact whose
    manifest differs, e.g. one rewritten and re-hashed after compilation.
    """
    if not isinstance(art_dir, (str, os.PathLike)):
        raise InputError(f"artifact: expected an artifact directory path, got {type(art_dir).__name__}")
    art = os.path.abspath(art_dir)
    if not os.path.isdir(art):
        raise InputError(f"{art_dir}: artifact directory not found; create one with `adatoken-compile compile --out DIR`")
    mpath = os.path.join(art, MANIFEST)
    if not os.path.isfile(mpath):
        raise InputError(f"{art_dir}: no {MANIFEST}; not an adatoken-compile artifact ({RECOMPILE})")
    if expected_digest is not None and (not isinstance(expected_digest, str)
                                        or not DIGEST.fullmatch(expected_digest.strip())):
        raise InputError(f"--digest {expected_digest!r}: not an artifact digest; pass the sha256:<64 hex digits> "
                         "that `adatoken-compile compile` printed")
    if os.path.isdir(mpath):
        raise InputError(f"{mpath}: is a directory, not a manifest; {RECOMPILE}")
    data, digest = _read_manifest(art_dir, mpath)
    if expected_digest is not None and digest != expected_digest.strip():
        raise InputError(f"{mpath}: manifest digest {digest} differs from the expected {expected_digest}; "
                         "the artifact was changed after compilation, use the artifact you compiled")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{mpath}: not an adatoken-compile artifact manifest (format {got!r}); {RECOMPILE}")
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise InputError(f"{mpath}: artifact version {data.get('version')!r} unsupported (this runtime reads {VERSION}); {RECOMPILE}")
    for key in ("files", "graphs", "model", "schedule"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"{mpath}: manifest entry '{key}' missing or not an object; {RECOMPILE}")
    for key in ("embed_tokens", "preprocess", "tokenizer"):
        if not isinstance(data.get(key), str):
            raise InputError(f"{mpath}: manifest entry '{key}' missing or not a path; {RECOMPILE}")
    if "prefill" not in data["graphs"]:
        raise InputError(f"{mpath}: manifest lists no prefill graph; {RECOMPILE}")
    model = Fields(data["model"], mpath, RECOMPILE, "model.")
    model.string("fingerprint")
    model.string("family")
    Schedule.from_dict(data["schedule"], where=f"{mpath}: 'schedule'")
    root_real = os.path.realpath(art)
    files = data["files"]
    for rel, info in files.items():
        inside(root_real, rel, art, "file")
        size, sha = (info.get("size"), info.get("sha256")) if isinstance(info, dict) else (None, None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str) \
                or not _SHA256.fullmatch(sha):
            raise InputError(f"{mpath}: file entry '{rel}' needs an integer size >= 0 and a sha256 of 64 hex digits; "
                             f"{RECOMPILE}")
    named = []
    for n, g in data["graphs"].items():
        if not isinstance(g, dict) or not isinstance(g.get("file"), str):
            raise InputError(f"{mpath}: graph '{n}' has no file; {RECOMPILE}")
        ext = g.get("external_data", [])
        if not isinstance(ext, list) or not all(isinstance(e, str) for e in ext):
            raise InputError(f"{mpath}: graph '{n}' external_data must be a list of paths; {RECOMPILE}")
        gdir = os.path.dirname(g["file"])
        named.append((g["file"], f"graph '{n}'"))
        named += [(os.path.normpath(os.path.join(gdir, e)).replace(os.sep, "/"), f"external data of graph '{n}'") for e in ext]
    named += [(data["embed_tokens"], "embed_tokens"), (data["preprocess"], "preprocess")]
    tok = data["tokenizer"].rstrip("/")
    named.append((f"{tok}/tokenizer.json", "tokenizer"))  # tokenizer_config.json is read only when listed too
    for rel, what in named:
        inside(root_real, rel, art, what)
        if rel.replace("\\", "/") not in files:
            raise InputError(f"{art}: {what} file '{rel}' is not listed (hashed) in the manifest; {RECOMPILE}")
    for rel, info in files.items():
        full = inside(root_real, rel, art, "file")
        if not os.path.isfile(full):
            raise InputError(f"{os.path.join(art, rel)}: missing from the artifact; {RECOMPILE}")
        size = os.path.getsize(full)
        if size != info["size"]:
            raise InputError(f"{os.path.join(art, rel)}: size {size} != {info['size']} in the manifest "
                             f"(truncated or modified); {RECOMPILE}")
        if check_hashes and sha256_file(full) != info["sha256"]:
            raise InputError(f"{os.path.join(art, rel)}: sha256 differs from the manifest (file tampered or corrupted); {RECOMPILE}")
    for name, g in data["graphs"].items():
        gpath = inside(root_real, g["file"], art, f"graph '{name}'")
        try:
            locs = _onnx_external_locations(gpath)
        except Exception as e:
            raise InputError(f"{gpath}: not a readable ONNX file ({type(e).__name__}); {RECOMPILE}")
        gdir = os.path.dirname(g["file"])
        for loc in locs or []:
            if os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
                raise InputError(f"{gpath}: external-data location '{loc}' points outside the artifact; refusing to load it")
            rel = os.path.normpath(os.path.join(gdir, loc)).replace(os.sep, "/")
            inside(root_real, rel, art, f"external data of graph '{name}'")
            if rel not in files:
                raise InputError(f"{gpath}: external-data file '{loc}' is not listed (hashed) in the manifest; {RECOMPILE}")
    return Manifest(art, data, digest)
