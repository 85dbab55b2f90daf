"""The one way this tool writes outputs: a temporary path beside the target, renamed into place.

Every command that writes a file or a directory goes through :func:`atomic_file` or
:func:`atomic_dir`, so a crash, an error or an interrupt leaves either the old output or the new
one, never half of one, and never deletes what the tool did not create:

* an existing target is replaced only when it is provably this tool's own output of the same
  kind, by a record the tool wrote listing every file with its size and sha256, and holding
  nothing else (:func:`owned_by_tool`, :func:`owned_file`) AND the caller passed ``overwrite=True``;
  anything else is refused with one line before any work is done (:func:`check_output`, also
  callable up front);
* temporary paths are directories named ``.<target>.tmp-<pid>-<random>`` holding a record that names them; SIGINT and
  SIGTERM remove them (:func:`cleanup_on_signals`, :func:`signals_cleanup`), and stale ones left
  by a killed process (its pid no longer running) are removed the next time a command checks the
  same output path;
* a failed write (a full disk, a folder made read-only meanwhile) is one
  :class:`~adatoken_compile.errors.InputError` naming the path, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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

# The record that proves a directory is this tool's output: an artifact's manifest (its "files"
# table), otherwise the marker file. Either lists every file with its size and sha256; a directory
# holding anything else (a file a user added, a symlink, a FIFO) or a file that changed since is not
# the tool's to replace, whatever name or marker it carries.
_ARTIFACT_RECORD = ("manifest.json", "format", "adatoken-compile/artifact")
_HASH_CHUNK = 1 << 20


def _tmp_name(final: str) -> str:
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _read_json(path: str):
    # records are small: anything that is not a small regular file is not one of them
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > (16 << 20):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree(root: str) -> tuple[dict, str | None]:
    """``({relative path: size}, None)`` for every regular file under ``root``, or the first entry that
    is not a regular file or a plain directory (a symlink, a FIFO, a socket) as the second item."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                st = os.lstat(full)
            except OSError:
                return files, f"'{rel}' (unreadable)"
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                return files, f"'{rel}' ({what})"
            files[rel] = st.st_size
    return files, None


def file_record(root: str) -> dict:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root`` but the tool's own records."""
    files, odd = _tree(root)
    if odd is not None:
        raise InputError(f"{root}: holds {odd}; an output holds regular files only")
    return {rel: {"sha256": _sha256(os.path.join(root, rel)), "size": size} for rel, size in sorted(files.items())
            if rel not in (MARKER, _TEMP_MARKER)}


def _record_of(path: str) -> tuple[str | None, dict | None, set]:
    """(kind, files table, the record's own file names) of the record in directory ``path``."""
    man = _read_json(os.path.join(path, _ARTIFACT_RECORD[0]))
    if isinstance(man, dict) and man.get(_ARTIFACT_RECORD[1]) == _ARTIFACT_RECORD[2]:
        files = man.get("files")
        return "artifact", files if isinstance(files, dict) else None, {_ARTIFACT_RECORD[0]}
    rec = _read_json(os.path.join(path, MARKER))
    if isinstance(rec, dict) and rec.get("tool") == TOOL and isinstance(rec.get("kind"), str):
        files = rec.get("files")
        return rec["kind"], files if isinstance(files, dict) else None, {MARKER}
    return None, None, set()


def _first(names) -> str:
    names = sorted(names)
    return f"'{names[0]}'" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def not_owned_reason(path: str, kind: str) -> str | None:
    """None when directory ``path`` is provably this tool's output of ``kind``: its record lists every
    file it holds with the same size and sha256, and it holds nothing else. Otherwise what is in the
    way, in a few words."""
    if not os.path.isdir(path) or os.path.islink(path):
        return "it is not a directory this tool wrote"
    got, files, own = _record_of(path)
    if got is None:
        return f"it is not an adatoken-compile {kind} output (no record of one)"
    if got != kind:
        return f"it is an adatoken-compile {got} output, not a {kind} output"
    if files is None or not all(isinstance(k, str) and isinstance(v, dict) for k, v in files.items()):
        return f"its record does not list its files (an older or edited {kind} output)"
    present, odd = _tree(path)
    if odd is not None:
        return f"it holds {odd}, which this tool does not write"
    extra = set(present) - set(files) - own
    if extra:
        return f"it holds {_first(extra)} that this tool did not write"
    missing = set(files) - set(present)
    if missing:
        return f"{_first(missing)} listed in its record is missing"
    for rel, info in sorted(files.items()):
        if present[rel] != info.get("size") or _sha256(os.path.join(path, rel)) != info.get("sha256"):
            return f"'{rel}' changed since this tool wrote it"
    return None


def owned_by_tool(path: str, kind: str) -> bool:
    """Is ``path`` a directory this tool provably wrote as output of ``kind`` (:func:`not_owned_reason`)?"""
    return not_owned_reason(path, kind) is None


SCENE_COMMENT = b"adatoken-compile scene"  # zip comment of the scene .npz files make-scene writes
FILE_KINDS = ("scene", "predictions", "questions")


def record_path(path: str) -> str:
    """The record beside an output file (``.<name>.adatoken-compile.json``): its kind, size and sha256."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.adatoken-compile.json")


def _file_record(path: str):
    rec = _read_json(record_path(path))
    return rec if isinstance(rec, dict) and rec.get("tool") == TOOL and isinstance(rec.get("kind"), str) else None


def not_owned_file_reason(path: str, kind: str) -> str | None:
    """None when ``path`` is a file this tool provably wrote as output of ``kind``: the record beside it
    names that kind and the file's size and sha256. Otherwise what is in the way."""
    try:
        st = os.lstat(path)
    except OSError:
        return "it cannot be read"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file this tool wrote"
    rec = _file_record(path)
    if rec is None:
        return f"it is not an adatoken-compile {kind} file (no record of one beside it)"
    if rec["kind"] != kind:
        return f"it is an adatoken-compile {rec['kind']} file, not a {kind} file"
    if rec.get("size") != st.st_size or rec.get("sha256") != _sha256(path):
        return "it changed since this tool wrote it"
    return None


def owned_file(path: str, kind: str) -> bool:
    """Is ``path`` a file this tool provably wrote as output of ``kind`` (``scene``, ``predictions``, ``questions``)?"""
    return kind in FILE_KINDS and not_owned_file_reason(path, kind) is None


def write_file_record(path: str, kind: str) -> None:
    """Write the record that proves ``path`` is this tool's ``kind`` output (after it is in place)."""
    rec = record_path(path)
    tmp = _tmp_name(rec)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"tool": TOOL, "kind": kind, "file": os.path.basename(path), "size": os.path.getsize(path),
                       "sha256": _sha256(path)}, f)
            f.write("\n")
        os.replace(tmp, rec)
    except OSError as e:
        _remove(tmp)
        raise _write_error(rec, e) from e


def mark_scene(path: str) -> None:
    """Stamp a scene ``.npz`` with the zip comment naming this tool (the arrays are untouched); the
    proof of ownership is the record :func:`write_file_record` writes beside it."""
    with zipfile.ZipFile(path, "a") as z:
        z.comment = SCENE_COMMENT


def write_marker(dir_path: str, kind: str) -> None:
    """Record ``dir_path`` as this tool's output of ``kind``: every file in it, with size and sha256."""
    files = file_record(dir_path)
    with open(os.path.join(dir_path, MARKER), "w", encoding="utf-8") as f:
        json.dump({"tool": TOOL, "kind": kind, "files": files}, f)
        f.write("\n")


def _temp_record(name: str) -> str:
    return json.dumps({"tool": TOOL, "temp": name})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_own_temp(p: str, name: str) -> bool:
    # a temporary path is this tool's when it is a directory holding the record written when it was
    # made, naming that very path: a user's file or folder of the same name is not
    if not os.path.isdir(p) or os.path.islink(p):
        return False
    try:
        st = os.lstat(os.path.join(p, _TEMP_MARKER))
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return False
        with open(os.path.join(p, _TEMP_MARKER), encoding="utf-8") as f:
            return f.read() == _temp_record(name)
    except (OSError, ValueError):
        return False


def clean_stale_temps(final: str) -> list[str]:
    """Remove ``.<target>.tmp-<pid>-*`` paths beside ``final`` left by processes no longer running.

    Only what provably came from this tool is touched: a temporary directory holding the record
    written when it was made, or an earlier output set aside (its own record proves it) which goes
    back in place when nothing replaced it. A user's file or folder of such a name is left alone."""
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
        if _is_own_temp(p, name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            continue
        kind = _record_of(p)[0] if os.path.isdir(p) and not os.path.islink(p) else None
        if kind is None or not owned_by_tool(p, kind):
            continue
        # an earlier output set aside while its replacement was renamed in, then the process was
        # killed: put it back when nothing replaced it, else it was replaced on purpose
        if not os.path.lexists(final):
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def check_output(path: str, kind: str, *, overwrite: bool = False, is_dir: bool = True) -> str:
    """Refuse, before any work, an output path this tool may not write; return it absolute.

    Refused: a parent that is not a directory or not writable; an existing directory that is not
    provably this tool's output of ``kind`` (:func:`not_owned_reason`), or is, without
    ``overwrite``; the same for an existing file (:func:`not_owned_file_reason`), or one of the
    wrong sort (a directory where a file is wanted, a file where a directory is wanted).
    Temporary paths an interrupted earlier run left beside ``path`` are removed
    (:func:`clean_stale_temps`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{path!r}: an output path must be a string, got {type(path).__name__}; pass --out PATH")
    if not str(path).strip():
        raise InputError(f"{path!r}: empty output path; pass --out PATH")
    path = os.fspath(path)
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
                raise InputError(f"{path}: exists and is not a directory this tool wrote; choose another output path, "
                                 "nothing was changed")
            if os.listdir(final):  # an empty directory holds nothing to lose: it is filled in place
                why = not_owned_reason(final, kind)
                if why is not None:
                    raise InputError(f"{path}: exists and is not an adatoken-compile {kind} output to replace "
                                     f"({why}); choose another output path, nothing was changed")
                if not overwrite:
                    raise InputError(f"{path}: an earlier {kind} output exists; pass --overwrite to replace it, or "
                                     "choose another output path")
        else:
            if os.path.isdir(final):
                raise InputError(f"{path}: is a directory; pass a file path")
            why = not_owned_file_reason(final, kind)
            if why is not None:
                raise InputError(f"{path}: exists and is not an adatoken-compile {kind} file to replace ({why}); "
                                 "choose another output path, nothing was changed")
            if not overwrite:
                raise InputError(f"{path}: an earlier {kind} file exists; pass --overwrite to replace it, or choose "
                                 "another output path")
    if not is_dir:
        rec = record_path(final)
        if os.path.lexists(rec) and _file_record(final) is None:
            raise InputError(f"{path}: the record path {rec} beside it holds something this tool did not write; "
                             "move it away or choose another output path, nothing was changed")
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


_DISK_FULL = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("StorageFull", errno.ENOSPC),
              ("Disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT))


def _disk_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or what a writer that wraps it reports (safetensors raises
    ``SafetensorError: ... IoError(Os { code: 28, kind: StorageFull ...})``, torch a RuntimeError),
    so a full disk is one line whichever library was writing."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, (InputError, KeyboardInterrupt, SystemExit)):
        return None
    text = str(e)
    for needle, code in _DISK_FULL:
        if needle in text:
            return OSError(code, os.strerror(code))
    return None


def _umask_mode(mode: int) -> int:
    um = os.umask(0)
    os.umask(um)
    return mode & ~um


def _make_temp_dir(final: str) -> str:
    tmp = _tmp_name(final)
    _live_temps[tmp] = None
    os.makedirs(tmp)
    os.chmod(tmp, _umask_mode(0o777))
    with open(os.path.join(tmp, _TEMP_MARKER), "w", encoding="utf-8") as f:
        f.write(_temp_record(os.path.basename(tmp)))
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, overwrite: bool = False, marker: bool = True) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    ``path`` is checked first (:func:`check_output`). At the end the record that proves the output
    is this tool's is written: an artifact's manifest is its own record; every other kind gets the
    marker file listing each file with its size and sha256 (``marker=False`` is kept for callers
    that write an artifact). On any exception the temporary directory is removed and ``path`` is
    left as it was.
    """
    final = check_output(path, kind, overwrite=overwrite, is_dir=True)
    existed = os.path.lexists(final) and bool(os.listdir(final))
    tmp, old = None, None
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = _make_temp_dir(final)
        yield tmp
        os.remove(os.path.join(tmp, _TEMP_MARKER))
        if kind != "artifact":
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
    except BaseException as e:
        _undo(tmp, old, final)
        disk = _disk_error(e)
        if disk is not None:
            raise _write_error(path, disk) from e
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

    The temporary file lives in a temporary directory carrying this tool's temp record, so a killed
    run's leftovers are recognised by that record, never by a name alone. ``kind`` (``scene``,
    ``predictions``, ``questions``): the output is checked first (:func:`check_output`) and the
    record proving it is this tool's is written beside it (:func:`write_file_record`); None skips
    both for files inside a directory this process is writing (checked and recorded as a whole)."""
    final = check_output(path, kind, overwrite=overwrite, is_dir=False) if kind else os.path.abspath(path)
    existed = os.path.lexists(final)
    tdir = None
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tdir = _make_temp_dir(final)
        tmp = os.path.join(tdir, os.path.basename(final))
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, _umask_mode(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH))
        if kind and os.path.lexists(final) and (not owned_file(final, kind) or not (existed or overwrite)):
            raise InputError(f"{path}: was written by something else while this command ran; nothing was replaced, "
                             "choose another output path or pass --overwrite")
        os.replace(tmp, final)
        if kind:
            write_file_record(final, kind)
    except Exception as e:
        disk = _disk_error(e)
        if disk is not None:
            raise _write_error(path, disk) from e
        raise
    finally:
        if tdir is not None:
            _remove(tdir)
            _live_temps.pop(tdir, None)


def write_text(path: str, text: str, kind: str | None = None, *, overwrite: bool = False) -> str:
    """Write ``text`` to ``path`` atomically (UTF-8); ``kind`` as in :func:`atomic_file`."""
    with atomic_file(path, kind, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj, kind: str | None = None, *, overwrite: bool = False, indent: int = 2) -> str:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically; ``kind`` as in :func:`atomic_file`."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n", kind, overwrite=overwrite)
