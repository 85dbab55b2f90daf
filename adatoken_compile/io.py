"""The one way this tool writes outputs: a temporary path beside the target, renamed into place.

Every command that writes a file or a directory goes through :func:`atomic_file` or
:func:`atomic_dir`, so a crash, an error or an interrupt leaves either the old output or the new
one, never half of one, and never deletes what the tool did not create:

* an existing target is replaced only when it is recognisably this tool's own output of the same
  kind (:func:`owned_by_tool`) AND the caller passed ``overwrite=True``; anything else is refused
  with one line before any work is done (:func:`check_output`, also callable up front);
* temporary paths are named ``.<target>.tmp-<pid>-<random>`` and carry a marker file; SIGINT and
  SIGTERM remove them (:func:`cleanup_on_signals`), and stale ones left by a killed process (its
  pid no longer running) are removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import sys
from typing import Iterator

from .errors import InputError

TOOL = "adatoken-compile"
MARKER = ".adatoken-compile-output.json"  # inside directories this tool wrote that have no manifest of their own
_TMP_TAG = ".tmp-"
_live_temps: set[str] = set()

# Each output kind and the file that proves a directory is this tool's own output of that kind.
# (An artifact's manifest, a calibration's schedule, otherwise the marker file.)
_OWN_FILES = {
    "artifact": ("manifest.json", "format", "adatoken-compile/artifact"),
    "calibration": ("schedule.json", "schema", "adatoken-compile/schedule"),
}


def _tmp_name(final: str) -> str:
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def owned_by_tool(path: str, kind: str) -> bool:
    """Is ``path`` a directory this tool wrote as output of ``kind``?"""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    own = _OWN_FILES.get(kind)
    if own is not None:
        d = _read_json(os.path.join(path, own[0]))
        if isinstance(d, dict) and d.get(own[1]) == own[2]:
            return True
    d = _read_json(os.path.join(path, MARKER))
    return isinstance(d, dict) and d.get("tool") == TOOL and d.get("kind") == kind


def write_marker(dir_path: str, kind: str) -> None:
    """Mark a directory as this tool's output of ``kind`` (for kinds without a manifest)."""
    with open(os.path.join(dir_path, MARKER), "w", encoding="utf-8") as f:
        json.dump({"tool": TOOL, "kind": kind}, f)
        f.write("\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(final: str) -> list[str]:
    """Remove ``.<target>.tmp-<pid>-*`` paths beside ``final`` left by processes no longer running.
    Only paths carrying this tool's temp marker (or plain files of that name) are removed."""
    d, base = os.path.split(os.path.abspath(final))
    prefix = f".{base}{_TMP_TAG}"
    removed = []
    try:
        names = os.listdir(d or ".")
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_txt = name[len(prefix):].split("-", 1)[0].split(".", 1)[0]
        if not pid_txt.isdigit() or int(pid_txt) == os.getpid() or _pid_alive(int(pid_txt)):
            continue
        p = os.path.join(d, name)
        if os.path.isdir(p) and not os.path.islink(p):
            if not os.path.exists(os.path.join(p, ".adatoken-compile-temp")):
                continue
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
        removed.append(p)
    return removed


def check_output(path: str, kind: str, *, overwrite: bool = False, is_dir: bool = True) -> str:
    """Refuse, before any work, an output path this tool may not write; return it absolute.

    Refused: a parent that is not a directory or not writable; an existing directory that is
    not this tool's output of ``kind`` (or is, without ``overwrite``); an existing file of the
    wrong kind (a directory where a file is wanted, a file where a directory is wanted, or any
    existing file without ``overwrite``).
    """
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"{path!r}: empty output path; pass --out PATH")
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    anc = parent
    while not os.path.exists(anc):
        up = os.path.dirname(anc)
        if up == anc:
            break
        anc = up
    if not os.path.isdir(anc):
        raise InputError(f"{path}: its parent {anc} is a file, not a directory; choose another output path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write in {anc} (permission denied); choose a writable output path")
    if os.path.lexists(final):
        if is_dir:
            if not os.path.isdir(final) or os.path.islink(final):
                raise InputError(f"{path}: exists and is not a directory this tool wrote; choose another output path")
            if not owned_by_tool(final, kind):
                if os.listdir(final):
                    raise InputError(f"{path}: exists and is not an adatoken-compile {kind} output (it holds other "
                                     "files); choose another output path, nothing was changed")
                # an empty directory holds nothing to lose: it is filled in place of being replaced
            elif not overwrite:
                raise InputError(f"{path}: an earlier {kind} output exists; pass --overwrite to replace it, or choose "
                                 "another output path")
        else:
            if os.path.isdir(final):
                raise InputError(f"{path}: is a directory; pass a file path")
            if not overwrite:
                raise InputError(f"{path}: exists; pass --overwrite to replace it, or choose another output path")
    return final


def _handle_signal(signum, frame):  # pragma: no cover - exercised through subprocess tests
    for p in list(_live_temps):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
    _live_temps.clear()
    sys.stderr.write(f"error: interrupted by signal {signum}; temporary outputs removed, nothing written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def cleanup_on_signals() -> None:
    """Make SIGINT/SIGTERM remove every temporary path this process has open, then exit 128+n."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: the caller cleans up
            signal.signal(sig, _handle_signal)


def _umask_mode(mode: int) -> int:
    um = os.umask(0)
    os.umask(um)
    return mode & ~um


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, overwrite: bool = False, marker: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    ``path`` is checked first (:func:`check_output`). ``marker``: also write the ownership marker
    (kinds whose directory has no manifest or schedule of its own). On any exception the
    temporary directory is removed and ``path`` is left as it was.
    """
    final = check_output(path, kind, overwrite=overwrite, is_dir=True)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    clean_stale_temps(final)
    tmp = _tmp_name(final)
    os.makedirs(tmp)
    os.chmod(tmp, _umask_mode(0o777))
    open(os.path.join(tmp, ".adatoken-compile-temp"), "w").close()
    _live_temps.add(tmp)
    old = None
    try:
        yield tmp
        os.remove(os.path.join(tmp, ".adatoken-compile-temp"))
        if marker:
            write_marker(tmp, kind)
        if os.path.isdir(final):
            if os.listdir(final) and not owned_by_tool(final, kind):  # changed while we worked
                raise InputError(f"{path}: was filled by something else while this command ran; nothing was replaced")
            old = _tmp_name(final)
            os.replace(final, old)
            _live_temps.add(old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and os.path.exists(old) and not os.path.exists(final):
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _live_temps.discard(tmp)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _live_temps.discard(old)


@contextlib.contextmanager
def atomic_file(path: str, *, overwrite: bool = False, checked: bool = True) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on success it is renamed onto ``path``.

    ``checked=False`` skips :func:`check_output` for files inside a directory this process is
    writing (already checked as a whole)."""
    final = check_output(path, "file", overwrite=overwrite, is_dir=False) if checked else os.path.abspath(path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if checked:
        clean_stale_temps(final)
    tmp = _tmp_name(final)
    _live_temps.add(tmp)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, _umask_mode(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        _live_temps.discard(tmp)


def write_text(path: str, text: str, *, overwrite: bool = True, checked: bool = False) -> str:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_file(path, overwrite=overwrite, checked=checked) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj, *, overwrite: bool = True, checked: bool = False, indent: int = 2) -> str:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n", overwrite=overwrite, checked=checked)
