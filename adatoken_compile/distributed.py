"""Data parallelism under torchrun: one process per device, the same result as one process.

``torchrun --nproc-per-node N -m adatoken_compile calibrate ...`` starts N processes (ranks). Each
takes its share of the samples, fixed by index (:class:`Share`); the int64 statistics are summed
exactly (:func:`all_reduce_int64`); what depends on order (agreement counts, predictions) travels
in the order one process would have produced it (:func:`in_order`, :func:`gather_ordered`); rank 0
alone writes and shows progress (:func:`on_main`, :func:`is_main`). Outside torchrun (or with one
process) every function here is the one-process identity and torch is not imported, so the
torch-free CLI can call them.

Failures: every collective here starts with a status exchange, and a command runs inside
:func:`session`, whose exit is one too. A rank that raises takes part in the next exchange with its
error instead, so every rank learns of it at the same point and raises the first failing rank's
error (an :class:`InputError` keeps its one line); no rank is left waiting for one that has
stopped. A rank that dies outright is torchrun's to handle: it stops the others.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from adatoken_compile.errors import InputError


class _State:
    depth = 0  # nesting of session() (a command calls API functions that are sessions too)
    agreed = False  # a failure every rank knows of is on its way out


def _torch():
    import torch  # torch: not in the runtime install; only a torchrun launch gets here

    return torch


def _dist():
    """torch.distributed once a launch has initialised it, else None (torch never imported for that)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def launched() -> bool:
    """Started by torchrun (or another launcher setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> bool:
    """Join the process group torchrun describes (gloo for the CPU tensors exchanged here, NCCL for
    CUDA ones when there is a GPU); True when there is more than one process."""
    if _dist() is None and launched():
        torch = _torch()
        dist = torch.distributed
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(_leave)
    return active()


def active() -> bool:
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs, prints and shows progress (torchrun's ``RANK``
    says so before the group is joined, e.g. for a usage error every rank meets alike)."""
    if not active() and launched():
        return os.environ.get("RANK", "0") == "0"
    return rank() == 0


def close() -> None:
    """Leave the process group together, at the end of a command that ended normally or with an
    error every rank knows of: a barrier first, so that rank 0 has printed before torchrun sees
    any rank exit (it then stops the others)."""
    if active():
        _dist().barrier()
    _leave()


def _leave() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- failures
def _check(error: BaseException | None = None) -> None:
    """The status exchange: every rank says whether it failed; if any did, every rank raises: a
    rank that failed its own exception, the others the lowest failing rank's error."""
    dist = _dist()
    torch = _torch()
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    if not int(flag[0]):
        return
    _State.agreed = True
    mine = None if error is None else (isinstance(error, InputError), type(error).__name__, str(error))
    got = [None] * world()
    dist.all_gather_object(got, mine)
    if error is not None:
        raise error
    who = next(r for r, g in enumerate(got) if g is not None)
    user, name, text = got[who]
    raise (InputError(text) if user else RuntimeError(f"rank {who} failed with {name}: {text}"))


@contextlib.contextmanager
def session():
    """Run a command (or an API call) on every rank: joins torchrun's process group if there is
    one; leaves with a status exchange, so an error on any rank is raised on every rank."""
    if not init():
        yield
        return
    _State.depth += 1
    outer = _State.depth == 1
    try:
        yield
        if outer:
            _check()
    except Exception as e:
        if outer and not _State.agreed:
            _check(e)
        raise
    finally:
        _State.depth -= 1
        if outer:
            _State.agreed = False


def collective(fn: Callable) -> Callable:
    """Decorator: ``fn`` runs inside :func:`session` (an API function every rank calls)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with session():
            return fn(*a, **kw)

    return wrapper


def on_main(fn: Callable, *a, **kw):
    """``fn(*a, **kw)`` on rank 0 alone (writing an output), once every rank has got here without an
    error; every rank returns rank 0's result, or raises its error."""
    if not active():
        return fn(*a, **kw)
    _check()
    out, err = None, None
    if is_main():
        try:
            out = fn(*a, **kw)
        except Exception as e:
            err = e
    _check(err)
    box = [out]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- shares
def owns(index: int, block: int = 1) -> bool:
    """Does this rank own item ``index``? Blocks of ``block`` consecutive items, round-robin over
    the ranks (block ``g`` on rank ``g % world``)."""
    return (index // block) % world() == rank()


class Share:
    """A data source's ``keep`` predicate: accepts this rank's share of the samples and records
    what the source listed, so every rank knows the whole without loading it.

    ``keep(i, j)`` is called once per sample in order with its position ``i`` and its scene's
    position ``j`` (both from 0); a source loads a scene only when it keeps one of its samples.
    ``block``: blocks of that many consecutive samples (one calibration batch each, so every batch
    is the one one process forms); ``by_scene``: whole scenes instead (evaluation answers a scene's
    questions together). After loading: ``positions`` of the kept samples, ``scenes`` listed.
    """

    def __init__(self, block: int = 1, by_scene: bool = False):
        self.block, self.by_scene = block, by_scene
        self.positions: list[int] = []
        self.scenes = 0

    def __call__(self, i: int, j: int) -> bool:
        self.scenes = max(self.scenes, j + 1)
        ok = owns(j) if self.by_scene else owns(i, self.block)
        if ok:
            self.positions.append(i)
        return ok


# ---------------------------------------------------------------------- collectives
def _all_gather(obj) -> list:
    _check()
    got = [None] * world()
    _dist().all_gather_object(got, obj)
    return got


def first(value):
    """Rank 0's ``value`` on every rank (what the first shard saw: one process's first batch)."""
    return _all_gather(value)[0] if active() else value


def total(n: int) -> int:
    """Sum of an integer over the ranks (rows, samples)."""
    return sum(_all_gather(int(n))) if active() else int(n)


def any_true(flag: bool) -> bool:
    """Is ``flag`` true on any rank? (A decision every rank must take alike.)"""
    return any(_all_gather(bool(flag))) if active() else bool(flag)


def all_reduce_int64(arrays: dict, op: Callable[[str], str]) -> dict:
    """Exact elementwise reduction over the ranks of named int64 arrays; ``op(name)`` says
    ``"sum"``, ``"min"`` or ``"max"``. Integer reductions are exact, so the result is what one
    process holding every rank's data computes."""
    if not active():
        return arrays
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    out = dict(arrays)
    for kind, red in ops.items():
        names = [k for k in arrays if op(k) == kind]
        if not names:
            continue
        flat = _torch().from_numpy(np.concatenate([np.ascontiguousarray(arrays[k], dtype=np.int64).ravel() for k in names]))
        _check()
        dist.all_reduce(flat, op=red)
        at = 0
        for k in names:
            n = arrays[k].size
            out[k] = flat[at:at + n].numpy().reshape(arrays[k].shape).copy()
            at += n
    return out


def in_order(items: Sequence, fn: Callable) -> Iterator:
    """``fn`` over this rank's ``items`` (its share: global item ``g`` is on rank ``g % world``, its
    ``g // world``-th), yielded on every rank for every rank's items in global order.

    Lazy, one round of ``world`` items at a time: a consumer that stops after item ``g`` (deciding
    on what it has seen, which every rank has seen alike) stops every rank after that round, and
    has seen exactly what one process stopping at ``g`` saw."""
    if not active():
        for item in items:
            yield fn(item)
        return
    rounds = max(_all_gather(len(items)))
    for k in range(rounds):
        mine = (True, fn(items[k])) if k < len(items) else (False, None)
        for has, value in _all_gather(mine):
            if has:
                yield value


def gather_ordered(positions: Sequence[int], *lists: list) -> tuple:
    """Every rank's ``lists`` (aligned with ``positions``, the items' global positions) merged on
    every rank in position order; one process: returned as they are."""
    if not active():
        return lists
    rows = [row for got in _all_gather((list(positions), *lists)) for row in zip(*got)]
    rows.sort(key=lambda row: row[0])
    return tuple([row[i + 1] for row in rows] for i in range(len(lists)))


def portable(samples: Iterable) -> list:
    """Samples without their scene or image arrays (what travels between ranks: the question,
    answer, kind and meta)."""
    return [dataclasses.replace(s, scene=None, image=None) for s in samples]
