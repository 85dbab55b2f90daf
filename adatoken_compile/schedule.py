"""The pruning schedule: static HOW MANY per layer, dynamic WHICH per input.

A schedule is a list of *cuts*. A cut ``{"layer": i, "keep": r, "rule": {...}}`` sits just before
decoder layer ``i`` (0 <= i < num_layers; a cut before layer 0 selects among the projected scene
tokens before the decoder runs, as serving engines prune): there, each row keeps
``k = clamp(ceil(r * N0), 1, N_now)`` of its spatial tokens, where ``N0`` is the row's original
spatial-token count and ``N_now`` the count still present. ``r`` is relative to the ORIGINAL count,
so ratios are non-increasing with depth. Non-spatial tokens (system prompt, question, padding
structure) are always kept.

The tokens kept are chosen at run time by the cut's selection rule (:mod:`adatoken_compile.selection`;
default ``last_token``, the last prompt token's attention), in their original order, keeping their
original position ids.

JSON (schema ``adatoken-compile/schedule``, version 2)::

    {
      "schema": "adatoken-compile/schedule", "version": 2,
      "policy": "adaptive",
      "model": {"fingerprint": "...", "family": "llava3d", "num_layers": 8, "name": "..."},
      "cuts": [{"layer": 2, "keep": 0.5, "rule": {"name": "last_token"}},
               {"layer": 4, "keep": 0.2, "rule": {"name": "stratified", "grid": [4, 4, 1], "rank": "attention"}}],
      "positions": "original",
      "predicted": {"flops_ratio": 0.41, "formula": "...", "spatial_tokens": 1400, "text_tokens": 60},
      "calibration": {...free-form provenance...}
    }

Version-1 files (one ``scoring`` dict for every cut, cuts before layers 1..L-1) still load: their
``scoring`` becomes each cut's rule (``last_token``, or ``random`` with its seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from adatoken_compile.errors import InputError, ScheduleMismatch
from adatoken_compile.io import write_json
from adatoken_compile.readers import Fields, read_json
from adatoken_compile.selection import Rule, check_rule

SCHEMA = "adatoken-compile/schedule"
VERSION = 2
READS = (1, 2)  # schema versions this build loads
MAX_LAYERS = 1024  # decoder depth a schedule may name: every layer costs a loop and an entry (7B models have 32)
REGENERATE = "regenerate it with `adatoken-compile calibrate`"

# version 1's one scoring rule for all cuts (read, translated into per-cut rules, never written)
DEFAULT_SCORING = {
    # which query row(s) score the spatial tokens: the last real token of the prompt, i.e. the
    # last instruction token ("ASSISTANT:"), at sequence position L-1 under left padding
    "query": "last_token",
    # keys: the post-RoPE keys of the layer just before the cut (layer i-1), exactly as the prefill
    # computes them for its KV cache; the query row is that layer's query for the last token.
    # No attention weights are read from the attention kernel, so SDPA/fused attention keep working.
    "keys": "prev_layer_rope",
    # softmax over all real keys of the row (causal row of the last token), scaled by 1/sqrt(d)
    "normalize": "softmax_real_keys",
    # reduce the per-head probabilities by the mean over query heads
    "head_reduction": "mean",
}


# version 1's `random` peer policy: same counts, tokens chosen by a seeded pseudo-random score
RANDOM_SCORING = {"query": "random", "keys": "none", "normalize": "none", "head_reduction": "none"}


@dataclass(frozen=True)
class Cut:
    layer: int
    keep: float
    rule: Rule = Rule()

    def to_dict(self) -> dict:
        return {"layer": self.layer, "keep": self.keep, "rule": self.rule.to_dict()}


@dataclass
class Schedule:
    cuts: list[Cut]
    num_layers: int
    policy: str = "none"
    fingerprint: str | None = None
    family: str | None = None
    model_name: str | None = None
    positions: str = "original"
    predicted: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- semantics
    def is_identity(self) -> bool:
        return all(c.keep >= 1.0 for c in self.cuts)

    def effective_cuts(self) -> list[Cut]:
        """Cuts that actually drop something (keep < previous keep)."""
        out, prev = [], 1.0
        for c in self.cuts:
            if c.keep < prev:
                out.append(c)
                prev = c.keep
        return out

    def with_rule(self, rule: Rule | None = None, **changes) -> "Schedule":
        """A copy with every cut's rule replaced by ``rule`` (when given) and other fields changed."""
        cuts = [Cut(c.layer, c.keep, rule if rule is not None else c.rule) for c in self.cuts]
        return replace(self, cuts=cuts, predicted=dict(self.predicted), calibration=dict(self.calibration), **changes)

    def needs(self) -> frozenset:
        """Cut inputs the effective cuts' rules read (``xyz``: the graph takes token coordinates)."""
        return frozenset().union(*(c.rule.needs() for c in self.effective_cuts()))

    def keep_per_layer(self) -> list[float]:
        """Ratio of the original spatial tokens present at each layer's input."""
        ratios, cur, it = [], 1.0, iter(sorted(self.cuts, key=lambda c: c.layer))
        nxt = next(it, None)
        for layer in range(self.num_layers):
            while nxt is not None and nxt.layer == layer:
                cur = min(cur, nxt.keep)
                nxt = next(it, None)
            ratios.append(cur)
        return ratios

    @staticmethod
    def keep_count(keep: float, n0: int, n_now: int) -> int:
        """k for one row: clamp(ceil(keep * n0), 1, n_now) (0 when the row has no spatial tokens).

        Integer arithmetic with ``keep`` in millionths, the same the compiled graph performs."""
        if n_now <= 0:
            return 0
        num = int(round(float(keep) * 1_000_000))
        return max(1, min(n_now, -(-(n0 * num) // 1_000_000)))

    def tokens_per_layer(self, n_spatial: int) -> list[int]:
        """Spatial tokens present at each layer's input for a row with ``n_spatial`` tokens."""
        out, cur = [], n_spatial
        cuts = {c.layer: c.keep for c in self.effective_cuts()}
        for layer in range(self.num_layers):
            if layer in cuts:
                cur = self.keep_count(cuts[layer], n_spatial, cur)
            out.append(cur)
        return out

    # ---------------------------------------------------------------- validation / io
    def validate(self, where: str = "schedule") -> "Schedule":
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) \
                or not 1 <= self.num_layers <= MAX_LAYERS:
            raise InputError(f"{where}: model.num_layers must be in [1, {MAX_LAYERS}], got {str(self.num_layers)[:40]}")
        prev_layer, prev_keep = None, 1.0
        for c in self.cuts:
            if not isinstance(c.layer, int) or isinstance(c.layer, bool) or not (0 <= c.layer < self.num_layers):
                raise InputError(
                    f"{where}: cut layer {c.layer} out of range; cuts sit before layers 0..{self.num_layers - 1}"
                )
            if prev_layer is not None and c.layer <= prev_layer:
                raise InputError(f"{where}: cut layers must be strictly increasing (got {c.layer} after {prev_layer})")
            if not isinstance(c.keep, (int, float)) or isinstance(c.keep, bool) or not math.isfinite(c.keep) \
                    or not (0.0 < c.keep <= 1.0):
                raise InputError(f"{where}: keep ratio {c.keep} at layer {c.layer} must be in (0, 1]")
            if c.keep > prev_keep + 1e-12:
                raise InputError(
                    f"{where}: keep ratios must be non-increasing with depth ({c.keep} at layer {c.layer} > {prev_keep})"
                )
            if not isinstance(c.rule, Rule):
                raise InputError(f"{where}: cut at layer {c.layer} has no selection rule")
            check_rule(c.rule, c.layer, f"{where}: cut at layer {c.layer}")
            prev_layer, prev_keep = c.layer, c.keep
        if self.positions != "original":
            raise InputError(f"{where}: positions rule '{self.positions}' unsupported; only 'original' is implemented")
        return self

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "policy": self.policy,
            "model": {
                "fingerprint": self.fingerprint,
                "family": self.family,
                "num_layers": self.num_layers,
                "name": self.model_name,
            },
            "cuts": [c.to_dict() for c in self.cuts],
            "keep_per_layer": self.keep_per_layer(),
            "positions": self.positions,
            "predicted": self.predicted,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> "Schedule":
        """Parse and validate a schedule's JSON object (versions 1 and 2). Types are exact (a layer of
        1.7 or a keep of ``true`` is an error, not coerced); the model's fingerprint and family are required."""
        top = Fields(d, where, REGENERATE)
        if d.get("schema") != SCHEMA:
            raise InputError(f"{where}: not an adatoken-compile schedule (missing schema '{SCHEMA}'); {REGENERATE}")
        version = d.get("version")
        if isinstance(version, bool) or version not in READS:
            raise InputError(f"{where}: schedule version {str(version)[:40]} unsupported (this build reads "
                             f"{', '.join(map(str, READS))}); {REGENERATE}")
        model = top.obj("model")
        v1_rule = _v1_rule(top.obj("scoring", default={**DEFAULT_SCORING}).data, where) if version == 1 else None
        cuts = []
        for i, c in enumerate(top.array("cuts")):
            cut = Fields(c, where, REGENERATE, f"cuts[{i}].")
            rule = v1_rule if version == 1 else Rule.from_dict(cut.obj("rule", default={"name": "last_token"}).data, where)
            cuts.append(Cut(cut.integer("layer", lo=0, hi=MAX_LAYERS - 1), cut.number("keep", lo=0.0, hi=1.0, lo_open=True), rule))
        s = cls(
            cuts=cuts,
            num_layers=model.integer("num_layers", lo=1, hi=MAX_LAYERS),
            policy=top.string("policy", default="unknown"),
            fingerprint=model.string("fingerprint"),
            family=model.string("family"),
            model_name=model.string("name", default=None, null=True),
            positions=top.string("positions", default="original"),
            predicted=dict(top.obj("predicted", default={}).data),
            calibration=dict(top.obj("calibration", default={}).data),
        )
        return s.validate(where)

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Schedule":
        fix = "pass a schedule.json written by `adatoken-compile calibrate --out DIR`"
        return cls.from_dict(read_json(path, "schedule", fix), where=path)

    def check_model(self, fingerprint: str, num_layers: int, where: str = "schedule", family: str | None = None) -> None:
        """Refuse a schedule made for another model: depth, fingerprint and family must all match
        (a schedule without a fingerprint or family matches no model)."""
        if not self.fingerprint or not self.family:
            missing = "fingerprint" if not self.fingerprint else "family"
            raise ScheduleMismatch(f"{where}: schedule names no model {missing}, so it cannot be checked against this "
                                   f"model; calibrate a schedule for this model")
        if self.num_layers != num_layers:
            raise ScheduleMismatch(
                f"{where}: schedule is for a {self.num_layers}-layer model, this model has {num_layers}; "
                "calibrate a schedule for this model"
            )
        if self.fingerprint != fingerprint:
            raise ScheduleMismatch(
                f"{where}: schedule was calibrated on model {self.fingerprint[:12]}, not this one "
                f"({fingerprint[:12]}); run `adatoken-compile calibrate` on this model"
            )
        if family is not None and self.family != family:
            raise ScheduleMismatch(f"{where}: schedule is for a {self.family} model, this model is {family}; "
                                   "calibrate a schedule for this model")


def _v1_rule(scoring, where: str) -> Rule:
    """The per-cut rule of a version-1 file's one ``scoring`` dict."""
    if not isinstance(scoring, dict):
        raise InputError(f"{where}: scoring must be an object, got {scoring!r}")
    ref = RANDOM_SCORING if scoring.get("query") == "random" else DEFAULT_SCORING
    for k, v in ref.items():
        if scoring.get(k) != v:
            raise InputError(f"{where}: scoring.{k}={scoring.get(k)!r} unsupported; expected {v!r}")
    if ref is RANDOM_SCORING:
        seed = scoring.get("seed", 0)
        if not isinstance(seed, int):
            raise InputError(f"{where}: scoring.seed must be an integer")
        return Rule.of("random", seed=seed)
    return Rule()


def identity(num_layers: int, **kw) -> Schedule:
    return Schedule(cuts=[], num_layers=num_layers, policy="none", **kw)
