"""The one way this tool writes outputs: a temporary path beside the target, renamed into place.

Every command that writes a file or a directory goes through :func:`atomic_file` or
:func:`atomic_dir`, so a crash, an error or an interrupt leaves either the old output or the new
one, never half of one, and never deletes what the tool did not create:

* an existing target is replaced only when it is recognisably this tool's own output of the same
  kind (:func:`owned_by_tool`, :func:`owned_file`) AND the caller passed ``overwrite=True``;
  anything else is refused with one line before any work is done (:func:`check_output`, also
  callable up front);
* temporary paths are named ``.<target>.tmp-<pid>-<random>`` and carry a marker file; SIGINT and
  SIGTERM remove them (:func:`cleanup_on_signals`, :func:`signals_cleanup`), and stale ones left
  by a killed process (its pid no longer running) are removed the next time a command checks the
  same output path;
* a failed write (a full disk, a folder made read-only meanwhile) is one
  :class:`~adatoken_compile.errors.InputError` naming the path, with nothing left behind.
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
import tempfile
import zipfile
from typing import Iterator

from .errors import InputError

TOOL = "adatoken-compile"
MARKER = ".adatoken-compile-output.json"  # inside directories this tool wrote that have no manifest of their own
_TMP_TAG = ".tmp-"
_TEMP_MARKER = ".adatoken-compile-temp"
# temporary paths this process has open -> the path to move each back to on an interrupt (an
# earlier output set aside while its replacement is renamed in), or None (remove it)
_live_temps: dict[str, str | None] = {}

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


SCENE_COMMENT = b"adatoken-compile scene"  # zip comment of the scene .npz files make-scene writes


def _is_tool_scene(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.comment == SCENE_COMMENT
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _is_predictions(path: str) -> bool:
    d = _read_json(path)
    return isinstance(d, list) and all(isinstance(x, dict) and "prediction" in x and "question" in x for x in d)


def _is_made_questions(path: str) -> bool:
    # make-scene's ScanQA-form questions: ids "<scene>-<i>" and no annotated objects, which a
    # released ScanQA file (objects annotated on every question) never has
    d = _read_json(path)
    return isinstance(d, list) and bool(d) and all(
        isinstance(x, dict) and x.get("object_ids") == [] and isinstance(x.get("scene_id"), str)
        and str(x.get("question_id", "")).startswith(x["scene_id"] + "-") for x in d)


# Each file kind and how an existing file is recognised as this tool's own output of that kind.
_OWN_FILE_KINDS = {"scene": _is_tool_scene, "predictions": _is_predictions, "questions": _is_made_questions}


def owned_file(path: str, kind: str) -> bool:
    """Is ``path`` a file this tool wrote as output of ``kind`` (``scene``, ``predictions``, ``questions``)?"""
    test = _OWN_FILE_KINDS.get(kind)
    return test is not None and os.path.isfile(path) and not os.path.islink(path) and test(path)


def mark_scene(path: str) -> None:
    """Stamp a scene ``.npz`` as this tool's output (the zip comment; the arrays are untouched)."""
    with zipfile.ZipFile(path, "a") as z:
        z.comment = SCENE_COMMENT


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
            if not os.path.exists(os.path.join(p, _TEMP_MARKER)):
                # an earlier output set aside while its replacement was renamed in, then the process
                # was killed: put it back when nothing replaced it, else it was replaced on purpose
                kinds = [k for k in (*_OWN_FILES, _read_marker_kind(p)) if k and owned_by_tool(p, k)]
                if not kinds:
                    continue
                if not os.path.lexists(final):
                    os.replace(p, final)
                    removed.append(p)
                    continue
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
        removed.append(p)
    return removed


def _read_marker_kind(path: str) -> str | None:
    d = _read_json(os.path.join(path, MARKER))
    return d.get("kind") if isinstance(d, dict) and d.get("tool") == TOOL and isinstance(d.get("kind"), str) else None


def check_output(path: str, kind: str, *, overwrite: bool = False, is_dir: bool = True) -> str:
    """Refuse, before any work, an output path this tool may not write; return it absolute.

    Refused: a parent that is not a directory or not writable; an existing directory that is
    not this tool's output of ``kind`` (or is, without ``overwrite``); an existing file that is
    not this tool's output of ``kind`` (or is, without ``overwrite``), or of the wrong sort (a
    directory where a file is wanted, a file where a directory is wanted). Temporary paths an
    interrupted earlier run left beside ``path`` are removed (:func:`clean_stale_temps`).
    """
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"{path!r}: empty output path; pass --out PATH")
    if "\x00" in path:
        raise InputError(f"{path!r}: an output path cannot hold a NUL character; choose another output path")
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
            if not owned_file(final, kind):
                raise InputError(f"{path}: exists and is not an adatoken-compile {kind} file; choose another output "
                                 "path, nothing was changed")
            if not overwrite:
                raise InputError(f"{path}: an earlier {kind} file exists; pass --overwrite to replace it, or choose "
                                 "another output path")
    clean_stale_temps(final)  # what an interrupted earlier run left beside this output
    return final


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(p)


def remove_live_temps() -> None:
    """Remove every temporary path this process has open; an earlier output set aside for its
    replacement goes back in place."""
    for p, restore in list(_live_temps.items()):
        if restore is not None and os.path.lexists(p) and not os.path.lexists(restore):
            with contextlib.suppress(OSError):
                os.replace(p, restore)
                continue
        if restore is None:
            _remove(p)
    _live_temps.clear()


def _handle_signal(signum, frame):  # pragma: no cover - exercised through subprocess tests
    remove_live_temps()
    sys.stderr.write(f"error: interrupted by signal {signum}; temporary outputs removed, nothing written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def cleanup_on_signals() -> None:
    """Make SIGINT/SIGTERM remove every temporary path this process has open, then exit 128+n."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: the caller cleans up
            signal.signal(sig, _handle_signal)


@contextlib.contextmanager
def signals_cleanup() -> Iterator[None]:
    """:func:`cleanup_on_signals` for the duration of a block; the previous handlers come back after
    (the CLI runs commands in-process under test runners that keep their own handlers)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    try:
        old = {sig: signal.getsignal(sig) for sig in sigs}
        for sig in sigs:
            signal.signal(sig, _handle_signal)
    except (ValueError, OSError):  # not the main thread: atomic_dir's own cleanup still runs
        old = {}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A temporary directory (system temp folder) removed on exit, on errors and on SIGINT/SIGTERM."""
    d = tempfile.mkdtemp(prefix=prefix)
    _live_temps[d] = None
    try:
        yield d
    finally:
        _live_temps.pop(d, None)
        shutil.rmtree(d, ignore_errors=True)


def _write_error(path: str, e: OSError) -> InputError:
    what = e.strerror or type(e).__name__
    fix = "free some space" if e.errno == 28 else "check the folder's permissions and free space"
    return InputError(f"{path}: could not write the output ({what}); {fix}, or choose another output path; "
                      "nothing was changed")


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
    existed = os.path.lexists(final) and bool(os.listdir(final))
    tmp, old = None, None
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = _tmp_name(final)
        _live_temps[tmp] = None
        os.makedirs(tmp)
        os.chmod(tmp, _umask_mode(0o777))
        open(os.path.join(tmp, _TEMP_MARKER), "w").close()
        yield tmp
        os.remove(os.path.join(tmp, _TEMP_MARKER))
        if marker:
            write_marker(tmp, kind)
        if os.path.lexists(final):
            filled = os.path.isdir(final) and bool(os.listdir(final))
            # changed while we worked: someone else's files, or another run's output this one may not replace
            if not os.path.isdir(final) or os.path.islink(final) or (filled and not owned_by_tool(final, kind)) \
                    or (filled and not existed and not overwrite):
                raise InputError(f"{path}: was written by something else while this command ran; nothing was "
                                 "replaced, choose another output path or pass --overwrite")
            if filled:
                old = _tmp_name(final)
                _live_temps[old] = final
                os.replace(final, old)
        os.replace(tmp, final)
        _live_temps.pop(tmp, None)
    except OSError as e:
        _undo(tmp, old, final)
        raise _write_error(path, e) from e
    except BaseException:
        _undo(tmp, old, final)
        raise
    if old is not None:
        _live_temps.pop(old, None)
        shutil.rmtree(old, ignore_errors=True)


def _undo(tmp: str | None, old: str | None, final: str) -> None:
    """After a failure: the earlier output back in place, the temporary path gone."""
    if old is not None and os.path.lexists(old) and not os.path.lexists(final):
        with contextlib.suppress(OSError):
            os.replace(old, final)
    _live_temps.pop(old, None)
    if tmp is not None:
        _remove(tmp)
        _live_temps.pop(tmp, None)


@contextlib.contextmanager
def atomic_file(path: str, kind: str | None = None, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on success it is renamed onto ``path``.

    ``kind`` (``scene``, ``predictions``): the output is checked first (:func:`check_output`);
    None skips the check for files inside a directory this process is writing (checked as a
    whole)."""
    final = check_output(path, kind, overwrite=overwrite, is_dir=False) if kind else os.path.abspath(path)
    existed = os.path.lexists(final)
    tmp = _tmp_name(final)
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        _live_temps[tmp] = None
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, _umask_mode(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH))
        if kind and os.path.lexists(final) and (not owned_file(final, kind) or not (existed or overwrite)):
            raise InputError(f"{path}: was written by something else while this command ran; nothing was replaced, "
                             "choose another output path or pass --overwrite")
        os.replace(tmp, final)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _live_temps.pop(tmp, None)


def write_text(path: str, text: str, kind: str | None = None, *, overwrite: bool = False) -> str:
    """Write ``text`` to ``path`` atomically (UTF-8); ``kind`` as in :func:`atomic_file`."""
    with atomic_file(path, kind, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj, kind: str | None = None, *, overwrite: bool = False, indent: int = 2) -> str:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically; ``kind`` as in :func:`atomic_file`."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n", kind, overwrite=overwrite)
