"""Rendering in background processes (``--workers``), so that a core renders while another trains.

Processes are spawned, not forked: a fork of a process whose torch thread pool has started can
hang. Each worker runs on one torch thread (one core); the arrays they hand back are the ones the
training process would have computed, so the weights do not depend on ``--workers``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue

import numpy as np
import torch

from reference_model.scenes import SceneCache, scene_entry


@contextlib.contextmanager
def process_pool(workers: int):
    """A pool of ``workers`` spawned processes (None for 0: work in this process), one torch
    thread each."""
    if not workers:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _convert(x, kind: type, to):
    """``x`` with every ``kind`` instance in its nested tuples replaced by ``to(it)`` (tensors to
    numpy and back; nothing else is touched, numpy arrays a voxel map holds included)."""
    if isinstance(x, tuple):
        return tuple(_convert(v, kind, to) for v in x)
    return to(x) if isinstance(x, kind) else x


def _prefetch_worker(state: dict, seeds: list[int], relation_draws: int, templates, instances: bool, threads: int, out):
    """Background process of :class:`ScenePrefetch`: the entries of ``seeds``, in order, as numpy."""
    import traceback

    from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD
    from reference_model.vision import frozen_tower

    torch.set_num_threads(threads)
    try:
        cache = SceneCache(frozen_tower({k: torch.from_numpy(v) for k, v in state.items()}), CLIP_MEAN, CLIP_STD)
        for sd in seeds:
            e = scene_entry(cache, sd, relation_draws, templates, instances)
            # numpy, not tensors: torch would pass each tensor as a shared-memory handle, thousands of them
            out.put((sd, None if e is None else _convert(e, torch.Tensor, torch.Tensor.numpy)))
    except BaseException:
        out.put((None, traceback.format_exc()))


class ScenePrefetch:
    """Stage 2's first epoch renders each scene and runs the frozen tower over its 20 views (about
    0.5 s a scene on an idle core, most of an early step's time). ``--workers N`` prepares the
    scenes ahead, in visiting order, in N spawned processes (scene j of the order in worker j mod N,
    at most ``depth`` ahead each), while training steps run. Each worker runs on one torch thread
    (one core); with ``--threads 1`` the entries, and the trained weights, are the same bit for bit
    as without workers. ``done``: every scene of the order has been handed out."""

    def __init__(self, vision, seeds: list[int], workers: int, relation_draws: int, templates, instances: bool,
                 depth: int = 8):
        ctx = multiprocessing.get_context("spawn")
        state = {k: v.numpy() for k, v in vision.state_dict().items()}
        self.seeds, self.next = list(seeds), 0
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(workers)]
        self.procs = [ctx.Process(target=_prefetch_worker, daemon=True,
                                  args=(state, self.seeds[j::workers], relation_draws, templates, instances,
                                        1, q)) for j, q in enumerate(self.queues)]
        for pr in self.procs:
            pr.start()

    def get(self, seed: int):
        """The entry of ``seed``, which must be the next one of the visiting order."""
        if self.next >= len(self.seeds) or self.seeds[self.next] != seed:
            raise RuntimeError(f"scene prefetch: asked for scene {seed} out of the visiting order")
        j = self.next % len(self.queues)
        while True:
            try:
                got, e = self.queues[j].get(timeout=10)
                break
            except queue.Empty:
                if not self.procs[j].is_alive():
                    raise RuntimeError(f"scene prefetch: worker {j} exited (code {self.procs[j].exitcode}) "
                                       f"before scene {seed}") from None
        if got is None:
            raise RuntimeError(f"scene prefetch: worker {j} failed on scene {seed}:\n{e}")
        assert got == seed, (got, seed)
        self.next += 1
        return None if e is None else _convert(e, np.ndarray, torch.from_numpy)

    @property
    def done(self) -> bool:
        return self.next >= len(self.seeds)

    def close(self):
        for pr in self.procs:
            if pr.is_alive():
                pr.terminate()
            pr.join()
