"""Strict readers for the files a user hands the tool (torch-free).

* :func:`read_json`: a JSON file as the expected top-level type. Missing files, directories,
  non-UTF-8 bytes, invalid JSON, ``NaN``/``Infinity`` literals, oversized files and the wrong
  top-level type are each one :class:`~adatoken_compile.errors.InputError` naming the file.
* :class:`Fields`: exact-type access to a parsed JSON object. ``1.7`` is not an integer, ``true``
  is not a number, ``"4"`` is not an integer: nothing is coerced, every mismatch is one line
  naming the file, the key, what was expected and what was found.
* :func:`read_npz`: the named members of an ``.npz`` archive, each checked against a byte limit
  on its DECLARED (uncompressed) size and on the size its ``.npy`` header announces before any
  of it is decompressed; members not asked for are never read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
import zlib

import numpy as np

from .errors import InputError

MAX_JSON_BYTES = 64 << 20  # configs, manifests, schedules and statistics headers are kilobytes
# JSON that is data (question files, EmbodiedScan info files, tokenizer.json) may be larger; its
# limit keeps the parse under about 2 GB of memory (64 MB of "{}," is 1.6 GB of Python objects)
# and is raised by the user who has a larger file and the memory for it
MAX_DATA_JSON_ENV = "ADATOKEN_COMPILE_MAX_JSON_MB"


def max_data_json_bytes() -> int:
    """The size limit of a JSON data file: 64 MB, or ``ADATOKEN_COMPILE_MAX_JSON_MB`` megabytes."""
    raw = os.environ.get(MAX_DATA_JSON_ENV)
    if raw is None or not raw.strip():
        return MAX_JSON_BYTES
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if not 1 <= mb <= 1 << 20:
        raise InputError(f"{MAX_DATA_JSON_ENV}={raw!r}: must be a whole number of megabytes in [1, {1 << 20}] "
                         "(default 64); fix or unset the variable")
    return mb << 20
_NPY_HEADER = 1 << 16  # room for an .npy member's header on top of its data (numpy writes 128 bytes)
_MISSING = object()


_JSON_TYPES = ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
               (dict, "an object"))  # bool before int: True is an int to Python, not to JSON


def _json_type(v) -> str:
    if v is None:
        return "null"
    return next((name for t, name in _JSON_TYPES if isinstance(v, t)), type(v).__name__)


def _show(v) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(v) -> bool:
    # an integer of hundreds of digits is no float: math.isfinite would raise OverflowError
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def regular_file(path, what: str, fix: str, max_bytes: int | None = None) -> int:
    """The size of ``path`` once it is known to be a regular file (symlinks resolved first) of at most
    ``max_bytes``; a device, a FIFO or a socket (``/dev/zero``, a named pipe) would be read without
    end or block, so each is refused here, before any byte is read."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{path!r}: a {what} path must be a string; {fix}")
    if "\x00" in os.fspath(path):
        raise InputError(f"{os.fspath(path)!r}: a path cannot hold a NUL character; {fix}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found; {fix}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror}); {fix}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, not a {what} file; {fix}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise InputError(f"{path}: is {kind}, not a {what} file; {fix}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputError(f"{path}: {st.st_size} bytes is too large for a {what} (at most {max_bytes}); {fix}")
    return st.st_size


def read_bytes(path, what: str, fix: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (:func:`regular_file`), never more than ``max_bytes``
    even when it grows while it is read."""
    regular_file(path, what, fix, max_bytes)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror}); {fix}") from None
    if len(raw) > max_bytes:
        raise InputError(f"{path}: more than {max_bytes} bytes is too large for a {what}; {fix}")
    return raw


def parse_json_text(text: str, path, what: str, fix: str):
    """``json.loads`` with every way it fails on a user's text as one line: invalid JSON, ``NaN``,
    nesting too deep for the parser, an integer of thousands of digits."""
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a {what}; {fix}") from None
    except ValueError as e:  # includes the interpreter's limit on integer digits
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200]}); {fix}") from None


def read_json(path: str, what: str, fix: str, *, expect: type | tuple = dict, max_bytes: int = MAX_JSON_BYTES):
    """Parse the JSON file ``path`` (a ``what``: "schedule", "config", ...); ``fix`` ends every error."""
    raw = read_bytes(path, what, fix, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); {fix}") from None
    data = parse_json_text(text, path, what, fix)
    if not isinstance(data, expect):
        want = "an object" if expect is dict else "a list" if expect is list else "JSON"
        raise InputError(f"{path}: a {what} must be {want} at the top level, got {_json_type(data)}; {fix}")
    return data


class Fields:
    """Exact-type getters over one JSON object; errors read ``<where>: '<key>' must be ...; <fix>``.

    ``prefix`` is the dotted path of this object inside the file (``"model."``), so a nested key
    is named in full. A key absent from the object takes ``default`` when one is given, else it
    is an error; ``null`` is accepted only where ``null=True``.
    """

    def __init__(self, data, where: str, fix: str, prefix: str = ""):
        if not isinstance(data, dict):
            name = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise InputError(f"{where}: {name} must be an object, got {_json_type(data)}; {fix}")
        self.data, self.where, self.fix, self.prefix = data, where, fix, prefix

    def fail(self, key: str, want: str, value=_MISSING):
        got = "missing" if value is _MISSING else f"got {_show(value)}"
        raise InputError(f"{self.where}: '{self.prefix}{key}' must be {want}, {got}; {self.fix}")

    def _get(self, key: str, want: str, default, null: bool):
        if key not in self.data:
            if default is _MISSING:
                self.fail(key, want)
            return default, True
        v = self.data[key]
        if v is None:
            if not null:
                self.fail(key, want, v)
            return None, True
        return v, False

    def integer(self, key: str, *, lo: int | None = None, hi: int | None = None, default=_MISSING,
                null: bool = False) -> int | None:
        want = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + (
            f" in [{lo}, {hi}]" if lo is not None and hi is not None else "") + (
            f" <= {hi}" if hi is not None and lo is None else "")
        v, done = self._get(key, want, default, null)
        if done:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(key, want, v)
        return v

    def number(self, key: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               default=_MISSING, null: bool = False) -> float | None:
        left = "(" if lo_open else "["
        want = "a finite number" + (f" in {left}{lo}, {hi}]" if lo is not None and hi is not None else
                                    f" {'>' if lo_open else '>='} {lo}" if lo is not None else
                                    f" <= {hi}" if hi is not None else "")
        v, done = self._get(key, want, default, null)
        if done:
            return v
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not _finite(v)
                or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)):
            self.fail(key, want, v)
        return float(v)

    def string(self, key: str, *, choices=None, default=_MISSING, null: bool = False) -> str | None:
        want = ("one of " + ", ".join(repr(c) for c in choices)) if choices else "a non-empty string"
        v, done = self._get(key, want, default, null)
        if done:
            return v
        if not isinstance(v, str) or not v or (choices and v not in choices):
            self.fail(key, want, v)
        return v

    def boolean(self, key: str, *, default=_MISSING) -> bool:
        v, done = self._get(key, "true or false", default, False)
        if not done and not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def obj(self, key: str, *, default=_MISSING) -> "Fields":
        v, done = self._get(key, "an object", default, False)
        return Fields(v, self.where, self.fix, f"{self.prefix}{key}.")

    def array(self, key: str, *, default=_MISSING, length: int | None = None) -> list:
        want = "a list" + (f" of {length}" if length is not None else "")
        v, done = self._get(key, want, default, False)
        if not done and (not isinstance(v, list) or (length is not None and len(v) != length)):
            self.fail(key, want, v)
        return v

    def numbers(self, key: str, *, length: int, lo: float | None = None, lo_open: bool = False, default=_MISSING) -> list[float]:
        """A list of ``length`` finite numbers (each ``> lo`` with ``lo_open``, else ``>= lo``)."""
        bound = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
        want = f"a list of {length} finite numbers{bound}"
        v, done = self._get(key, want, default, False)
        if done:
            return v
        ok = isinstance(v, list) and len(v) == length and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x)
            and (lo is None or (x > lo if lo_open else x >= lo)) for x in v)
        if not ok:
            self.fail(key, want, v)
        return [float(x) for x in v]


def read_npz(path: str, members: dict, fix: str, *, optional: tuple = (), check_header=None) -> dict:
    """The arrays ``members`` names from the ``.npz`` at ``path``: ``{key: max_bytes}``.

    Each member's declared uncompressed size (less room for its header) and the data size its
    ``.npy`` header announces are checked against ``max_bytes`` before it is decompressed; members not named are never
    read; ``optional`` keys may be absent. Pickled (object) arrays are refused. ``check_header(key,
    shape, dtype)``, when given, may refuse a member from its header, before its data is read.
    """
    regular_file(path, ".npz", fix)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); {fix}") from None
    out = {}
    with zf:
        names = set(zf.namelist())
        for key, limit in members.items():
            name = f"{key}.npy"
            if name not in names:
                if key in optional:
                    continue
                out[key] = None  # the caller names the missing key with its expected shape
                continue
            info = zf.getinfo(name)
            if info.file_size > limit + _NPY_HEADER:
                raise InputError(f"{path}: member '{key}' declares {info.file_size} bytes, over the limit of {limit}; {fix}")
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if dtype.hasobject:
                        raise InputError(f"{path}: member '{key}' holds Python objects (pickle); refused; {fix}")
                    if check_header is not None:
                        check_header(key, shape, dtype)
                    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if nbytes > limit:
                        raise InputError(f"{path}: member '{key}' announces {nbytes} bytes ({shape} {dtype}), over the "
                                         f"limit of {limit}; {fix}")
                    data = f.read(nbytes + 1)
                if len(data) != nbytes:
                    raise InputError(f"{path}: member '{key}' holds {len(data)} data bytes, its header announces "
                                     f"{nbytes}; {fix}")
                arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
            except InputError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, zlib.error, NotImplementedError) as e:
                raise InputError(f"{path}: member '{key}' is not a readable .npy array ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); {fix}") from None
            out[key] = arr.copy()  # writable, owned
    return out
