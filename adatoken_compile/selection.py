"""The selection-rule catalogue (torch-free): names, parameters, what each reads, where each can run.

A schedule names a rule per cut (:class:`Rule`); the tensor functions live in
:mod:`adatoken_compile.passes.token_drop.rules` (the table there is keyed by these names). This
module is what the torch-free runtime and schedule validation need: a bad rule or parameter fails
on load with one line, and a rule that needs attention is refused before layer 0, where no layer
has run yet.

The inputs a rule may read at a cut before layer ``i``: ``attention`` (layer ``i-1``'s post-RoPE
queries and keys), ``hidden`` (the hidden state entering layer ``i``; before layer 0 the projected
scene tokens), ``xyz`` (token coordinates, a graph input only when a rule reads it) and ``srank``
(each spatial token's rank in the original scene order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from adatoken_compile.errors import InputError

PRIOR_BINS = 32  # positions of the scene order the debiased prior resolves (equal-width bins of the order)
DEFAULT_RULE = "last_token"


@dataclass(frozen=True)
class Rule:
    """A cut's selection rule: a catalogued name and its parameters (hashable; lists become tuples)."""

    name: str = DEFAULT_RULE
    params: tuple = ()  # sorted (key, value) pairs

    @classmethod
    def of(cls, name: str, **params) -> "Rule":
        def freeze(v):
            return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

        return cls(name, tuple(sorted((k, freeze(v)) for k, v in params.items())))

    def params_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params_dict()}

    @classmethod
    def from_dict(cls, d, where: str = "schedule") -> "Rule":
        if isinstance(d, str):
            return cls.of(d)
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise InputError(f"{where}: a cut's rule must be {{\"name\": ..., params}}, got {d!r}")
        return cls.of(d["name"], **{k: v for k, v in d.items() if k != "name"})

    def needs(self) -> frozenset:
        return needs(self.name, self.params_dict())

    def label(self) -> str:
        """Short text for tables and diffs: the name plus non-default parameters (prior elided)."""
        extra = [f"{k}={'...' if k == 'prior' else v}" for k, v in self.params
                 if k == "prior" or v != spec(self.name).defaults.get(k)]
        return self.name + (f"({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class RuleSpec:
    name: str
    defaults: dict
    summary: str
    reads: Callable[[dict], set]  # full parameters -> the cut inputs read
    choices: dict  # parameter -> the values it accepts


RULES: dict[str, RuleSpec] = {s.name: s for s in (
    RuleSpec("last_token", {}, "attention of the last prompt token (FastV-style)", lambda p: {"attention"}, {}),
    RuleSpec("text_tail", {"rows": 64}, "mean attention of the question rows after the scene",
             lambda p: {"attention"}, {}),
    RuleSpec("debiased", {"prior": None}, "last-token attention / calibrated per-position prior",
             lambda p: {"attention", "srank"}, {}),
    RuleSpec("stratified", {"grid": (4, 4, 1), "rank": "attention"},
             "a quota per spatial cell, ranked inside by attention (or a seeded hash)",
             lambda p: {"xyz"} | ({"attention"} if p["rank"] == "attention" else set()),
             {"rank": ("attention", "random")}),
    RuleSpec("dedup", {"pivots": 8, "features": "hidden", "threshold": 0.98},
             "pivots, then the tokens least similar to them; near-duplicates last (DART-style)",
             lambda p: {"attention" if p["features"] == "keys" else "hidden"}, {"features": ("hidden", "keys")}),
    RuleSpec("diverse", {"steps": 32, "xyz_weight": 1.0, "seed": "attention"},
             "farthest-point selection over features and coordinates",
             lambda p: {"hidden"} | ({"xyz"} if float(p["xyz_weight"]) > 0 else set())
             | ({"attention"} if p["seed"] == "attention" else set()), {"seed": ("attention", "norm")}),
    RuleSpec("strided", {}, "every (n/k)-th token of the scene order", lambda p: set(), {}),
    RuleSpec("random", {"seed": 0}, "a seeded hash of the token's rank", lambda p: set(), {}),
)}


def spec(name: str) -> RuleSpec:
    if name not in RULES:
        raise InputError(f"unknown selection rule '{name}'; choose one of {', '.join(RULES)}")
    return RULES[name]


def params_for(name: str, params: dict | None = None) -> dict:
    """The rule's full parameters: its defaults overridden by ``params``."""
    return {**spec(name).defaults, **(params or {})}


def needs(name: str, params: dict | None = None) -> frozenset:
    """Which cut inputs (attention, hidden, xyz, srank) the rule reads with these parameters."""
    return frozenset(spec(name).reads(params_for(name, params)))


def pre_llm(name: str, params: dict | None = None) -> bool:
    """Can the rule run before layer 0 (no attention there)?"""
    return "attention" not in needs(name, params)


def at_layer(name: str, layer: int, **params) -> Rule:
    """Rule ``name`` with the parameters that let it run before ``layer``: before layer 0 the rules
    that can do without attention rank by a hash (stratified) or seed by feature norm (diverse)."""
    if layer == 0 and name == "stratified":
        params.setdefault("rank", "random")
    if layer == 0 and name == "diverse":
        params.setdefault("seed", "norm")
    return Rule.of(name, **params)


def check_rule(rule: Rule, layer: int, where: str = "schedule") -> None:
    """InputError (one line) for an unknown rule, bad parameters, or a rule that cannot run at ``layer``."""
    name, params = rule.name, rule.params_dict()
    s = spec(name)
    unknown = set(params) - set(s.defaults)
    if unknown:
        raise InputError(f"{where}: rule '{name}' has no parameter {sorted(unknown)[0]!r}; "
                         f"it takes {', '.join(sorted(s.defaults)) or 'none'}")
    p = params_for(name, params)
    for key, allowed in s.choices.items():
        if p[key] not in allowed:
            raise InputError(f"{where}: rule '{name}' {key}={p[key]!r} unsupported; choose {' or '.join(allowed)}")
    if name == "debiased":
        prior = p["prior"]
        if not isinstance(prior, (list, tuple)) or not prior or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in prior):
            raise InputError(f"{where}: rule 'debiased' needs 'prior', a list of positive numbers measured by "
                             "`adatoken-compile calibrate`")
    if name == "stratified" and (not isinstance(p["grid"], (list, tuple)) or len(p["grid"]) != 3
                                 or any(not isinstance(g, int) or g < 1 for g in p["grid"])):
        raise InputError(f"{where}: rule 'stratified' grid must be 3 positive cell counts (x, y, z), got {p['grid']!r}")
    for key in ("pivots", "steps", "rows"):
        if key in p and (not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1):
            raise InputError(f"{where}: rule '{name}' {key} must be a positive integer, got {p[key]!r}")
    for key in ("threshold", "xyz_weight"):
        if key in p and (not isinstance(p[key], (int, float)) or not math.isfinite(p[key]) or p[key] < 0):
            raise InputError(f"{where}: rule '{name}' {key} must be a number >= 0, got {p[key]!r}")
    if name == "random" and (not isinstance(p["seed"], int) or isinstance(p["seed"], bool)):
        raise InputError(f"{where}: rule 'random' seed must be an integer")
    if layer == 0 and not pre_llm(name, params):
        raise InputError(f"{where}: rule '{name}' needs attention, which a cut before layer 0 does not have; "
                         "before layer 0 use strided, random, dedup (features hidden), stratified (rank random) "
                         "or diverse (seed norm)")


def drop_cost(rule: Rule, arch: dict, n_in: int, s_in: int, n_text: int) -> float:
    """FLOPs of a rule's scoring at a cut with ``n_in`` tokens (``s_in`` spatial) in the
    :mod:`adatoken_compile.flops` convention (a multiply-accumulate is 2); selection (top-k) is
    counted by the caller."""
    name = rule.name
    p = params_for(name, rule.params_dict())
    heads, hq, H = arch["heads"], arch["heads"] * arch["head_dim"], arch["hidden"]
    row = 2 * n_in * hq + 6 * n_in * heads  # one query row vs the cached keys, softmax, head mean
    att = row if "attention" in needs(name, p) else 0
    if name == "text_tail":
        return float(min(int(p["rows"]), max(1, int(n_text))) * row)
    if name == "stratified":
        return float(att + 2 * s_in * (math.prod(p["grid"]) + 1))
    if name == "dedup":
        D = H if p["features"] == "hidden" else arch["kv_heads"] * arch["head_dim"]
        return float(att + 2 * s_in * s_in * D + 2 * s_in * int(p["pivots"]) * D + 3 * s_in * D)
    if name == "diverse":
        return float(att + 3 * s_in * H + int(p["steps"]) * s_in * (2 * H + 10))
    if name in ("strided", "random"):
        return float(8 * n_in)
    return float(att + (n_in if name == "debiased" else 0))
