"""Peer schedules, scaled to the model's depth ``L`` (cuts sit before layer i, 0 < i < L).

* ``none``: identity (no cuts).
* ``fastv``: FastV with K=2, R=0.5: one cut before layer ``min(2, L-1)`` keeping 0.5 of the
  spatial tokens. K is not scaled with depth (FastV fixes it at layer 2).
  L=4 -> [(2, .5)]; L=8 -> [(2, .5)]; L=32 -> [(2, .5)].
* ``pdrop``: PyramidDrop (and the released AdaToken-3D code): cuts before layers
  ``round(L/4), round(L/2), round(3L/4)`` keeping 0.5, 0.25, 0.125 (clamped to 1..L-1; colliding
  cuts merge, keeping the smaller ratio). L=4 -> [(1,.5),(2,.25),(3,.125)];
  L=8 -> [(2,.5),(4,.25),(6,.125)]; L=32 -> [(8,.5),(16,.25),(24,.125)].
* ``adatoken-decay``: keep(l) = 0.1 ** (l / (L-1)), exponential from 1.0 at layer 0 to 0.1 at
  layer L-1, quantised to a cut every ``s = max(1, round(4 * L / 32))`` layers (before layers
  s, 2s, ... < L), each cut keeping keep(cut layer). L=32: s=4, cuts 4..28 keeping
  0.743 ... 0.125; L=8: s=1, cuts 1..7 keeping 0.720 ... 0.1; L=4: s=1, cuts 1,2,3 keeping
  0.464, 0.215, 0.1.
* ``random``: the cuts of a given schedule, tokens chosen by a seeded pseudo-random score
  (scoring :data:`adatoken_compile.schedule.RANDOM_SCORING`).
"""

from __future__ import annotations

from adatoken_compile.errors import InputError
from adatoken_compile.schedule import DEFAULT_SCORING, RANDOM_SCORING, Cut, Schedule

# every policy calibrate knows, in the order the CLI lists them; "adaptive" is solved from the
# statistics (solver), the others are fixed rules scaled to the model's depth (this module)
POLICIES = ("adaptive", "fastv", "pdrop", "adatoken-decay", "random", "none")
PEER_POLICIES = tuple(p for p in POLICIES if p != "adaptive")
# adaptive's agreement target when neither a target nor a FLOPs budget is given: the lower end of
# the 95% interval must reach 0.95, which on 384 held-back rows takes 374 agreeing (0.974, at most
# 10 changed); on 500 test questions of an earlier bundled model, cuts changing 1.4% of the answers
# kept the accuracy and cuts changing 3.6% lost 1.2 points
DEFAULT_FIDELITY = 0.95


def _clean(cuts: list[tuple[int, float]], L: int) -> list[Cut]:
    out: dict[int, float] = {}
    for layer, keep in cuts:
        layer = min(max(1, int(layer)), L - 1)
        out[layer] = min(out.get(layer, 1.0), float(keep))
    res, prev = [], 1.0
    for layer in sorted(out):
        keep = min(prev, out[layer])
        res.append(Cut(layer, round(keep, 6)))
        prev = keep
    return res


def fastv(num_layers: int, k: int = 2, keep: float = 0.5) -> list[Cut]:
    return [] if num_layers < 2 else _clean([(min(k, num_layers - 1), keep)], num_layers)


def pdrop(num_layers: int) -> list[Cut]:
    L = num_layers
    if L < 2:
        return []
    return _clean([(round(L / 4), 0.5), (round(L / 2), 0.25), (round(3 * L / 4), 0.125)], L)


def adatoken_decay(num_layers: int, final: float = 0.1) -> list[Cut]:
    L = num_layers
    if L < 2:
        return []
    step = max(1, round(4 * L / 32))
    return _clean([(c, final ** (c / (L - 1))) for c in range(step, L, step)], L)


def peer_schedule(policy: str, num_layers: int, *, like: Schedule | None = None, seed: int = 0, **model) -> Schedule:
    """A peer schedule for a ``num_layers``-deep model. ``model`` may hold fingerprint/family/model_name."""
    fixed = {"none": lambda L: [], "fastv": fastv, "pdrop": pdrop, "adatoken-decay": adatoken_decay}
    if policy in fixed:
        cuts = fixed[policy](num_layers)
    elif policy == "random":
        if like is None:
            raise InputError("policy 'random' needs a schedule to copy the token counts from (like=...)")
        if like.num_layers != num_layers:
            raise InputError(f"policy 'random': schedule has {like.num_layers} layers, model has {num_layers}")
        s = Schedule(cuts=list(like.cuts), num_layers=num_layers, policy="random",
                     scoring={**RANDOM_SCORING, "seed": int(seed)}, **model)
        return s  # not validated: schedule.validate accepts only DEFAULT_SCORING today
    else:
        raise InputError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
    return Schedule(cuts=cuts, num_layers=num_layers, policy=policy, scoring=dict(DEFAULT_SCORING), **model).validate(policy)
