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
  (rule ``random``).
* ``dart``: DART (duplicate-aware token reduction) with its published LLaVA-1.5 setting: one cut
  at layer K=2 keeping 128 of 576 image tokens (0.222), 8 pivots, similarity on the hidden state
  (rule ``dedup``). K is not scaled with depth (as FastV's); L=4 -> [(2, .222)], L=8 -> [(2, .222)].
* ``divprune``: DivPrune (max-min diversity before the LLM) with its published setting: keep 9.8% of
  the visual tokens before layer 0, selected by farthest-point diversity of the token features
  (rule ``diverse`` seeded by feature norm, no coordinates; ``steps`` greedy steps, then the
  rest by distance to them, where DivPrune runs the greedy to the end).
* ``prellm-strided`` / ``prellm-random``: one cut before layer 0 (what serving engines do: prune
  the projected scene tokens before the decoder) keeping every (n/k)-th token / a seeded random
  subset, with the keep ratio that gives the prefill FLOPs of a given schedule (``like``).
"""

from __future__ import annotations

import math

from adatoken_compile.errors import InputError
from adatoken_compile.flops import schedule_flops
from adatoken_compile.schedule import Cut, Schedule
from adatoken_compile.selection import Rule

# the peer methods at their published settings, in the order tables list them
PEERS = ("fastv", "pdrop", "adatoken-decay", "dart", "divprune")
# the peers that rank by attention at depth-scaled cuts inside the decoder: the calibration report
# draws them and the main job matches their FLOPs
DECODER_PEERS = PEERS[:3]
# every policy calibrate knows, in the order the CLI lists them; "adaptive" is solved from the
# statistics (solver), the others are fixed rules scaled to the model's depth (this module)
POLICIES = ("adaptive", *PEERS, "random", "prellm-strided", "prellm-random", "none")
PEER_POLICIES = tuple(p for p in POLICIES if p != "adaptive")
# policies that copy another schedule (its cuts, or its FLOPs): they need ``like``
LIKE_POLICIES = ("random", "prellm-strided", "prellm-random")
DART_KEEP = round(128 / 576, 6)  # DART's LLaVA-1.5 setting: 128 of 576 image tokens
DIVPRUNE_KEEP = 0.098  # DivPrune's main setting: 9.8% of the visual tokens
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


def dart(num_layers: int) -> list[Cut]:
    return [] if num_layers < 2 else [Cut(min(2, num_layers - 1), DART_KEEP, Rule.of("dedup", pivots=8))]


def divprune(num_layers: int) -> list[Cut]:
    return [Cut(0, DIVPRUNE_KEEP, Rule.of("diverse", seed="norm", xyz_weight=0.0))]


def keep_for_flops(arch: dict, num_layers: int, flops_ratio: float, n_spatial: float, n_text: float,
                   rule: Rule) -> float:
    """The keep ratio of one cut before layer 0 whose prefill FLOPs ratio is ``flops_ratio`` (bisection
    on the ratio to 1e-4; FLOPs grow with the ratio)."""
    def ratio(keep):
        return schedule_flops(arch, Schedule(cuts=[Cut(0, keep, rule)], num_layers=num_layers), n_spatial, n_text)["flops_ratio"]

    lo, hi = 1e-4, 1.0
    if ratio(lo) > flops_ratio + 1e-9:
        raise InputError(f"FLOPs ratio {flops_ratio:.3f} is out of reach even before layer 0: the text tokens and one "
                         f"spatial token cost {ratio(lo):.3f} of the unpruned prefill")
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if ratio(round(mid, 6)) > flops_ratio:
            hi = mid
        else:
            lo = mid
    return math.floor(lo * 1e4) / 1e4


def peer_schedule(policy: str, num_layers: int, *, like: Schedule | None = None, seed: int = 0,
                  arch: dict | None = None, tokens: tuple[float, float] | None = None, **model) -> Schedule:
    """A peer schedule for a ``num_layers``-deep model. ``model`` may hold fingerprint/family/model_name.
    ``like``: the schedule ``random`` copies the cuts of and the ``prellm-*`` policies the FLOPs of
    (those also need the model's ``arch`` and the mean (spatial, text) ``tokens`` to count FLOPs)."""
    fixed = {"none": lambda L: [], "fastv": fastv, "pdrop": pdrop, "adatoken-decay": adatoken_decay, "dart": dart,
             "divprune": divprune}
    if policy in fixed:
        cuts = fixed[policy](num_layers)
    elif policy in LIKE_POLICIES:
        if like is None:
            raise InputError(f"policy '{policy}' needs a schedule to copy the token counts / FLOPs from (like=...)")
        if like.num_layers != num_layers:
            raise InputError(f"policy '{policy}': schedule has {like.num_layers} layers, model has {num_layers}")
        if policy == "random":
            cuts = [Cut(c.layer, c.keep, Rule.of("random", seed=int(seed))) for c in like.cuts]
        else:
            if arch is None or tokens is None:
                raise InputError(f"policy '{policy}' needs the model's arch and token counts to match FLOPs")
            rule = Rule.of("strided") if policy == "prellm-strided" else Rule.of("random", seed=int(seed))
            target = schedule_flops(arch, like, *tokens)["flops_ratio"]
            cuts = [Cut(0, keep_for_flops(arch, num_layers, target, *tokens, rule), rule)]
    else:
        raise InputError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
    return Schedule(cuts=cuts, num_layers=num_layers, policy=policy, **model).validate(policy)
