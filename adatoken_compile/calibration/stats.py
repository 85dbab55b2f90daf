"""Additive calibration statistics: sums, counts and histograms, mergeable across runs.

Every array is int64. Quantities that are averaged (attention shares, retained mass) are stored
as FIXED-POINT sums: each per-query-row value ``v`` in [0, 1] is rounded once to
``round(v * 2**32)`` and the integers are added. Integer addition is associative, so merging two
disjoint shards gives exactly (bit for bit) what one run over both gives, in any order. Means are
derived: ``mean = sum / 2**32 / count``.

Layout (``Lyr`` layers, ``Hq`` query heads, ``R`` keep ratios, ``B`` histogram bins), for each
query group ``g`` in :data:`GROUPS` (``instr``: prompt text tokens after the last spatial token;
``last``: the last prompt token, the run-time scoring query; ``answer``: teacher-forced answer
tokens)::

    {g}_rows            (Lyr,)          query rows counted
    {g}_attn_spatial    (Lyr, Hq)       fixed-point sum of the row's attention mass on spatial tokens
    {g}_flow_spatial    (Lyr, Hq)       same for the information flow p_j * ||W_o,h v_j|| (normalised per row)
    {g}_hist_flow       (Lyr, Hq, B)    counts of per-spatial-token flow relative to the row's max
    {g}_hist_flow_mean  (Lyr, B)        same for the head-mean flow
    {g}_hist_attn_mean  (Lyr, B)        same for the head-mean attention probability
    retained_attn       (Lyr, Lyr, R)   [src, dst, r]: fixed-point sum over rows of the share of the
                                        last token's head-mean spatial attention at layer dst kept
                                        by the top ceil(r*N) spatial tokens ranked by the run-time
                                        score of layer src (src <= dst; src = dst - 1 is the proxy)
    retained_flow       (Lyr, Lyr, R)   same, measured with the head-mean flow at dst
    retained_answer     (Lyr, Lyr, R)   same, measured with the answer rows' mean attention at dst
    prior_attn          (Lyr, P)        fixed-point sum over rows of the share of the last token's head-mean
                                        spatial attention on each of P equal bins of the scene order
    prior_frac          (P,)            fixed-point sum over rows of the share of the row's spatial tokens
                                        in each bin (their ratio is the debiased rule's per-position prior)
    prior_rows          (1,)            rows counted in the prior (statistics written before it existed: 0)
    retained_rows, retained_answer_rows, samples, answer_samples, skipped_rows,
    spatial_tokens_sum, text_tokens_sum, answer_tokens_sum (1,)   counts
    spatial_tokens_min / _max (1,)      merged by min / max

Bin ``i`` of a histogram holds relative values in ``[i/B, (i+1)/B)`` (the value 1.0 goes to the
last bin); with B = 100 the fraction under 5% of the max is ``hist[..., :5].sum() / hist.sum()``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from adatoken_compile.arch import normalize as normalize_arch
from adatoken_compile.errors import InputError, ScheduleMismatch
from adatoken_compile.io import atomic_file
from adatoken_compile.readers import Fields, read_json, read_npz, regular_file
from adatoken_compile.selection import PRIOR_BINS

SCHEMA = "adatoken-compile/calibration-stats"
VERSION = 1
FIXED_SCALE = 2**32
GROUPS = ("instr", "last", "answer")
DEFAULT_RATIOS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_BINS = 100
_SCALARS = (
    "samples", "answer_samples", "skipped_rows", "spatial_tokens_sum", "text_tokens_sum",
    "answer_tokens_sum", "retained_rows", "retained_answer_rows", "prior_rows",
)
# arrays added after the first statistics files were written: missing in a file, they read as zeros
_LATER = ("prior_attn", "prior_frac", "prior_rows")


def to_fixed(x) -> np.ndarray:
    """Fixed-point int64 of values (torch or numpy), one rounding per value."""
    a = x.detach().to("cpu").double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    return np.rint(a * FIXED_SCALE).astype(np.int64)


@dataclass
class CalibrationStats:
    arch: dict
    fingerprint: str | None = None
    ratios: tuple = DEFAULT_RATIOS
    num_bins: int = DEFAULT_BINS
    arrays: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # free-form, non-additive provenance (not merged exactly)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, arch: dict, fingerprint: str | None = None, ratios=DEFAULT_RATIOS, num_bins=DEFAULT_BINS) -> "CalibrationStats":
        s = cls(arch=dict(arch), fingerprint=fingerprint, ratios=tuple(float(r) for r in ratios), num_bins=int(num_bins))
        s.arrays = {k: np.zeros(v, dtype=np.int64) for k, v in s._shapes().items()}
        s.arrays["spatial_tokens_min"][:] = np.iinfo(np.int64).max
        return s

    def _shapes(self) -> dict:
        L, h = self.arch["num_layers"], self.arch["heads"]
        R, B = len(self.ratios), self.num_bins
        sh = {k: (1,) for k in _SCALARS}
        sh.update({"spatial_tokens_min": (1,), "spatial_tokens_max": (1,)})
        for g in GROUPS:
            sh[f"{g}_rows"] = (L,)
            sh[f"{g}_attn_spatial"] = (L, h)
            sh[f"{g}_flow_spatial"] = (L, h)
            sh[f"{g}_hist_flow"] = (L, h, B)
            sh[f"{g}_hist_flow_mean"] = (L, B)
            sh[f"{g}_hist_attn_mean"] = (L, B)
        for k in ("retained_attn", "retained_flow", "retained_answer"):
            sh[k] = (L, L, R)
        sh["prior_attn"] = (L, PRIOR_BINS)
        sh["prior_frac"] = (PRIOR_BINS,)
        return sh

    def add(self, name: str, value) -> None:
        self.arrays[name] += np.asarray(value, dtype=np.int64)

    def note_tokens(self, n_spatial: int) -> None:
        self.arrays["spatial_tokens_min"][0] = min(int(self.arrays["spatial_tokens_min"][0]), n_spatial)
        self.arrays["spatial_tokens_max"][0] = max(int(self.arrays["spatial_tokens_max"][0]), n_spatial)

    # ------------------------------------------------------------------ merge
    def compatible(self, other: "CalibrationStats", where: str = "stats") -> None:
        if self.fingerprint != other.fingerprint:
            raise ScheduleMismatch(
                f"{where}: cannot merge statistics of model {str(self.fingerprint)[:12]} with model "
                f"{str(other.fingerprint)[:12]}; calibrate every shard on the same model"
            )
        if self.arch != other.arch or tuple(self.ratios) != tuple(other.ratios) or self.num_bins != other.num_bins:
            raise InputError(f"{where}: cannot merge statistics with different architecture, ratio grid or bins; re-run calibrate with the same settings")

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        return merge(self, other)

    # ------------------------------------------------------------------ derived
    @property
    def samples(self) -> int:
        return int(self.arrays["samples"][0])

    def mean_spatial_tokens(self) -> float:
        return self.arrays["spatial_tokens_sum"][0] / max(1, self.samples)

    def mean_text_tokens(self) -> float:
        return self.arrays["text_tokens_sum"][0] / max(1, self.samples)

    def spatial_share(self, group: str = "last", kind: str = "attn") -> np.ndarray:
        """(Lyr, Hq) mean share of a row's attention (kind="attn") or flow ("flow") on spatial tokens."""
        rows = self.arrays[f"{group}_rows"].astype(np.float64)[:, None]
        s = self.arrays[f"{group}_{kind}_spatial"].astype(np.float64) / FIXED_SCALE
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, s / np.maximum(rows, 1), np.nan)

    def hist(self, group: str = "last", kind: str = "flow_mean") -> np.ndarray:
        return self.arrays[f"{group}_hist_{kind}"]

    def fraction_below(self, threshold: float = 0.05, group: str = "last", kind: str = "flow_mean") -> np.ndarray:
        """Per layer: fraction of spatial tokens whose relative contribution is under ``threshold``
        (``threshold`` is rounded to a bin edge)."""
        h = self.hist(group, kind).astype(np.float64)
        if h.ndim == 3:
            h = h.sum(axis=1)
        nb = int(round(threshold * self.num_bins))
        tot = h.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, h[..., :nb].sum(axis=-1) / np.maximum(tot, 1), np.nan)

    def position_prior(self, layer: int) -> list[float] | None:
        """The debiased rule's prior for a cut scored with ``layer``'s attention: per bin of the scene
        order, the last token's mean attention share there over the bin's mean token share (1 = as
        much attention as tokens; the order's recency bias shows as values rising to the end).
        None when no row was counted."""
        if int(self.arrays["prior_rows"][0]) == 0:
            return None
        attn = self.arrays["prior_attn"][layer].astype(np.float64)
        frac = self.arrays["prior_frac"].astype(np.float64)
        dens = np.where(frac > 0, attn / np.maximum(frac, 1), 1.0)
        return [round(float(max(v, 1e-3)), 6) for v in dens]

    def retained(self, kind: str = "attn") -> np.ndarray:
        """(Lyr, Lyr, R) mean retained share [src, dst, ratio] (NaN where src > dst or no rows)."""
        rows = self.arrays["retained_answer_rows" if kind == "answer" else "retained_rows"][0]
        out = self.arrays[f"retained_{kind}"].astype(np.float64) / FIXED_SCALE / max(1, rows)
        L = self.arch["num_layers"]
        mask = np.triu(np.ones((L, L), dtype=bool))
        out[~mask] = np.nan
        if rows == 0:
            out[:] = np.nan
        return out

    # ------------------------------------------------------------------ io
    def _header(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "arch": self.arch,
            "ratios": list(self.ratios),
            "num_bins": self.num_bins,
            "fixed_scale": FIXED_SCALE,
            "groups": list(GROUPS),
            "samples": self.samples,
            "meta": self.meta,
        }

    def save(self, out_dir: str) -> None:
        """Write ``out_dir/stats.npz`` and ``out_dir/stats.json`` (each via temp file + rename)."""
        os.makedirs(out_dir, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        data = buf.getvalue()
        head = self._header()
        head["npz_sha256"] = hashlib.sha256(data).hexdigest()
        npz, js = os.path.join(out_dir, "stats.npz"), os.path.join(out_dir, "stats.json")
        for path, payload in ((npz, data), (js, (json.dumps(head, indent=2) + "\n").encode())):
            with atomic_file(path) as tmp, open(tmp, "wb") as f:
                f.write(payload)

    @classmethod
    def load(cls, out_dir: str) -> "CalibrationStats":
        """Read a calibration directory's statistics; every field is type-checked, the arrays are
        checked against the header's checksum and their expected shapes before they are used."""
        npz, js = os.path.join(out_dir, "stats.npz"), os.path.join(out_dir, "stats.json")
        fix = f"re-run `adatoken-compile calibrate --out {out_dir}`"
        for p in (npz, js):
            if not os.path.isfile(p):
                raise InputError(f"{p}: calibration statistics not found; {fix}")
        head = read_json(js, "statistics header", fix)
        f = Fields(head, js, fix)
        if head.get("schema") != SCHEMA:
            raise InputError(f"{js}: not adatoken-compile calibration statistics (schema '{SCHEMA}' missing); {fix}")
        if head.get("version") != VERSION or isinstance(head.get("version"), bool):
            raise InputError(f"{js}: statistics version {head.get('version')!r} unsupported (this build reads {VERSION}); {fix}")
        arch = normalize_arch(f.obj("arch").data, f"{js}: 'arch'")
        ratios = f.array("ratios")
        if not ratios or len(ratios) > 1000 or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios):
            f.fail("ratios", "a list of 1 to 1000 ratios in (0, 1]", ratios)
        s = cls(arch=arch, fingerprint=f.string("fingerprint"), ratios=tuple(float(r) for r in ratios),
                num_bins=f.integer("num_bins", lo=1, hi=10_000), meta=dict(f.obj("meta", default={}).data))
        want = s._shapes()
        if sum(int(np.prod(v)) for v in want.values()) > 1 << 28:
            raise InputError(f"{js}: statistics of {arch['num_layers']} layers x {len(ratios)} ratios x {s.num_bins} bins "
                             f"are too large to be real; {fix}")
        digest = f.string("npz_sha256", default=None, null=True)
        if digest is not None:
            # a regular file no larger than the arrays it must hold, before all of it is hashed
            regular_file(npz, "statistics archive", fix, sum(int(np.prod(v)) * 8 + (1 << 16) for v in want.values())
                         + (1 << 20))
            with open(npz, "rb") as fh:
                h = hashlib.sha256()
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise InputError(f"{npz}: does not match {js} (checksum); {fix}")
        arrays = read_npz(npz, {k: int(np.prod(shp)) * 8 for k, shp in want.items()}, fix)
        for k in _LATER:  # statistics written before the position prior was mined: zero counts
            if arrays.get(k) is None:
                arrays[k] = np.zeros(want[k], np.int64)
        bad = [k for k, shp in want.items() if arrays[k] is None or arrays[k].shape != shp
               or arrays[k].dtype.kind not in "iu" or (arrays[k] < 0).any()]
        if bad:
            raise InputError(f"{npz}: arrays {bad[:3]} missing, misshaped, negative or not integers; {fix}")
        s.arrays = {k: v.astype(np.int64) for k, v in arrays.items()}
        return s


def reduce_op(name: str) -> str:
    """How shards of array ``name`` combine: ``"min"``, ``"max"`` or ``"sum"`` (everything else)."""
    return "min" if name.endswith("_min") else "max" if name.endswith("_max") else "sum"


_COMBINE = {"min": np.minimum, "max": np.maximum, "sum": np.add}


def merge(a: CalibrationStats, b: CalibrationStats) -> CalibrationStats:
    """Exact merge of two shards (same model, ratio grid and bins)."""
    a.compatible(b, where="merge")
    out = CalibrationStats(arch=dict(a.arch), fingerprint=a.fingerprint, ratios=a.ratios, num_bins=a.num_bins,
                           meta={"merged": [a.meta, b.meta]})
    for k, v in a.arrays.items():
        out.arrays[k] = _COMBINE[reduce_op(k)](v, b.arrays[k])
    return out
