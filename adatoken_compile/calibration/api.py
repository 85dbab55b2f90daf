"""Public calibrate API: statistics + schedule from a decoder and calibration batches.

    schedule, stats = calibrate(decoder, batches, policy="adaptive", fidelity=0.95)
    write_calibration("out/cal", schedule, stats)   # schedule.json, stats.npz/.json, report.*

``batches`` yields :class:`DecoderInputs`, or ``(DecoderInputs, answers)`` pairs where
``answers[b]`` is None, a 1-D LongTensor of answer token ids, or an (A, H) embedding tensor
(appended after the prompt with teacher forcing for the answer-side statistics).

Under torchrun each process passes its share of the batches, and of the held-back batches
(batch ``g`` on rank ``g % world``, see :mod:`adatoken_compile.distributed`): the statistics are
summed over the ranks and the agreement counts gathered in order, so every rank derives the schedule
one process derives from all the batches.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Iterable

import torch
from tqdm.auto import tqdm

from adatoken_compile import distributed
from adatoken_compile.contract import DecoderInputs, collate
from adatoken_compile.errors import InputError
from adatoken_compile.io import atomic_dir
from adatoken_compile.arch import from_config as arch_of
from adatoken_compile.flops import FORMULA, schedule_flops
from adatoken_compile.models.spec import spec_for
from adatoken_compile.schedule import Schedule
from adatoken_compile.calibration import layered
from adatoken_compile.calibration.defaults import default_holdout
from adatoken_compile.calibration.observers import AttentionObserver
from adatoken_compile.calibration.policies import LIKE_POLICIES, POLICIES, peer_schedule
from adatoken_compile.calibration.solver import ROW_KEY, ValidationCache, public, solve
from adatoken_compile.calibration.report import write_report
from adatoken_compile.calibration.stats import DEFAULT_BINS, DEFAULT_RATIOS, CalibrationStats, merge, reduce_op

def decoder_fingerprint(decoder) -> str:
    """Hash of the config and of every parameter's name, shape, dtype and a strided sample of its values."""
    h = hashlib.sha256(decoder.config.to_json_string(use_diff=False).encode())
    for name, p in decoder.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _rows(decoder, batches) -> tuple[list, int]:
    H = int(decoder.config.hidden_size)
    out, bs = [], 0
    for item in batches:
        ans = None
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InputError("calibrate: batches must yield DecoderInputs or (DecoderInputs, answers) pairs")
            item, ans = item
        if not isinstance(item, DecoderInputs):
            raise InputError(f"calibrate: expected DecoderInputs, got {type(item).__name__}")
        e = item.inputs_embeds
        if e.ndim != 3 or e.shape[-1] != H:
            raise InputError(f"calibrate: inputs_embeds must be (B, L, {H}) for this decoder, got {tuple(e.shape)}")
        if not torch.isfinite(e).all():
            raise InputError("calibrate: inputs_embeds contain NaN/inf; check the encoder output")
        for t, nm in ((item.attention_mask, "attention_mask"), (item.position_ids, "position_ids"), (item.spatial_mask, "spatial_mask")):
            if tuple(t.shape) != tuple(e.shape[:2]):
                raise InputError(f"calibrate: {nm} must be {tuple(e.shape[:2])}, got {tuple(t.shape)}")
        if ans is not None and len(ans) != item.batch_size:
            raise InputError(f"calibrate: {len(ans)} answers for a batch of {item.batch_size} rows")
        bs = bs or item.batch_size
        for b in range(item.batch_size):
            out.append((item.segment(b), None if ans is None else ans[b]))
    return out, max(1, bs)


def _batches(rows, bs):
    for i in range(0, len(rows), bs):
        chunk = rows[i : i + bs]
        ans = [a for _, a in chunk]
        yield collate([s for s, _ in chunk]), (None if all(a is None for a in ans) else ans), len(chunk)


def calibrate(decoder, batches: Iterable, *, policy: str = "adaptive", fidelity: float | None = None,
              flops_budget: float | None = None, holdout: float | int | None = None, seed: int = 0, progress: bool = True,
              fingerprint: str | None = None, family: str | None = None, model_name: str | None = None,
              like: Schedule | None = None, prior: CalibrationStats | None = None, max_cuts: int | None = 4,
              max_validations: int = 16, batch_size: int | None = None, ratios=DEFAULT_RATIOS,
              num_bins: int = DEFAULT_BINS, holdout_batches: Iterable | None = None,
              cache=None, rules=None, layers=None) -> tuple[Schedule, CalibrationStats]:
    """Mine attention statistics over ``batches`` and derive a schedule with ``policy``.

    ``holdout``: fraction in [0, 1) or a row count held back from the statistics to validate
    schedules on (needed by ``adaptive``; peers get their fidelity measured on it too); None: the
    package API's count (:func:`adatoken_compile.calibration.defaults.default_holdout`: 384 rows,
    1,536 with ``rules``), refused when ``batches`` do not hold more rows than that.
    ``holdout_batches``: a separate iterable (same kind as ``batches``) to validate on instead;
    every row of ``batches`` then goes into the statistics. ``cache``: a ``solver.ValidationCache``
    to reuse in later ``derive_schedule`` calls on the same held-back rows.
    ``prior``: statistics of earlier shards to merge with (same model). ``like``: the schedule
    whose counts ``random`` copies (and whose FLOPs the ``prellm-*`` policies match). ``rules``:
    selection rules the adaptive solver considers at each cut (None: ``solver.DEFAULT_RULES``; "all").
    ``layers``: a :class:`adatoken_compile.calibration.layered.StreamedLayers` to run the statistics,
    the references and the validations layer-major (same numbers; the decoder's layers may then be
    placeholders whose weights it reads from the checkpoint); None: sample-major.
    """
    if policy not in POLICIES:
        raise InputError(f"calibrate: unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
    if flops_budget is not None and not (0.0 < float(flops_budget) < 1.0):
        raise InputError(f"calibrate: FLOPs budget {flops_budget} must be a ratio in (0, 1)")
    if fidelity is not None and not (0.0 < float(fidelity) <= 1.0):
        raise InputError(f"calibrate: fidelity target {fidelity} must be in (0, 1]")
    if fidelity is not None and flops_budget is not None:
        raise InputError("calibrate: give either a fidelity target or a FLOPs budget, not both")
    if isinstance(holdout, float) and not (0.0 <= holdout < 1.0):
        raise InputError(f"calibrate: holdout fraction {holdout} must be in [0, 1)")
    if policy in LIKE_POLICIES and like is None:
        raise InputError(f"calibrate: policy '{policy}' needs like=<schedule> to copy the token counts / FLOPs from")
    decoder.eval()
    arch = arch_of(decoder.config)
    if len(spec_for(decoder).layers(decoder)) != arch["num_layers"]:
        raise InputError("calibrate: decoder layer count disagrees with its config")
    fp = fingerprint or decoder_fingerprint(decoder)
    rows, bs = _rows(decoder, batches)
    bs = batch_size or distributed.first(bs)  # one process's: the first batch's, which is rank 0's
    if not distributed.total(len(rows)):
        raise InputError("calibrate: no calibration samples (the batch iterable was empty)")
    n = len(rows)
    if holdout_batches is None and holdout is None:
        holdout = default_holdout(bool(rules))
        if holdout >= n and not distributed.active():
            raise InputError(f"calibrate: the default holds back {holdout} rows to validate on, but the batches "
                             f"hold {n}; pass holdout_batches (other questions), holdout=<rows> or holdout=<fraction>")
    if holdout_batches is not None:
        cal_rows, hold_rows = rows, _rows(decoder, holdout_batches)[0]
    elif distributed.active() and holdout:
        raise InputError("calibrate: under torchrun pass each rank's share of the held-back rows as holdout_batches; "
                         "a holdout split of each rank's own rows is not the split one process makes")
    else:
        if isinstance(holdout, int) and holdout >= n:
            raise InputError(f"calibrate: holdout {holdout} rows leaves none of the {n} samples for the statistics; "
                             f"use more samples (e.g. --samples {holdout + 64}) or a smaller --holdout")
        n_hold = int(holdout) if isinstance(holdout, int) else int(round(holdout * n))
        if isinstance(holdout, float) and holdout > 0 and n >= 2:
            n_hold = max(1, n_hold)
        n_hold = min(n_hold, n - 1)
        if n_hold < 0:
            raise InputError(f"calibrate: holdout {holdout} must be >= 0")
        perm = list(range(n))
        random.Random(seed).shuffle(perm)
        hold_idx = set(perm[:n_hold])
        cal_rows = [r for i, r in enumerate(rows) if i not in hold_idx]
        hold_rows = [r for i, r in enumerate(rows) if i in hold_idx]
    holdout_batches = [b for b, _, _ in _batches([(s, None) for s, _ in hold_rows], bs)]

    stats = CalibrationStats.empty(arch, fp, ratios=ratios, num_bins=num_bins)
    stats.meta = {"seed": seed, "holdout_rows": distributed.total(len(hold_rows)), "policy": policy}
    obs = AttentionObserver(decoder, stats)
    t0 = time.time()
    bar = _bar(progress, len(cal_rows), "calibrate")
    if layers is not None:
        layered.observe(layers, obs, [(batch, ans) for batch, ans, _ in _batches(cal_rows, bs)])
        bar.update(len(cal_rows))
        if cache is None:
            cache = layered.validation_cache(layers)
    else:
        for batch, ans, k in _batches(cal_rows, bs):
            obs.observe(batch, ans)
            bar.update(k)
    bar.close()
    stats.arrays = distributed.all_reduce_int64(stats.arrays, reduce_op)
    stats.meta["observe_seconds"] = round(time.time() - t0, 2)
    if prior is not None:
        stats = merge(prior, stats)
    if stats.samples == 0:
        raise InputError("calibrate: no calibration sample has spatial tokens; check the spatial_mask of the inputs")

    sched = derive_schedule(decoder, stats, holdout_batches, policy=policy, fidelity=fidelity, flops_budget=flops_budget,
                            seed=seed, progress=progress, family=family, model_name=model_name, like=like,
                            max_cuts=max_cuts, max_validations=max_validations, cache=cache, rules=rules)
    sched.calibration["observe_seconds"] = stats.meta.get("observe_seconds")
    sched.calibration["engine"] = {"order": "layer-major" if layers is not None else "sample-major",
                                   **(layers.summary() if layers is not None else {})}
    return sched, stats


def derive_schedule(decoder, stats: CalibrationStats, holdout_batches: list, *, policy: str = "adaptive",
                    fidelity: float | None = None, flops_budget: float | None = None, seed: int = 0,
                    progress: bool = True, family: str | None = None, model_name: str | None = None,
                    like: Schedule | None = None, max_cuts: int | None = 4, max_validations: int = 16,
                    cache=None, rules=None) -> Schedule:
    """Schedule from (possibly merged) statistics; ``holdout_batches`` validate it end to end
    (``cache``: a ``solver.ValidationCache`` shared by several derivations on the same rows)."""
    arch = arch_of(decoder.config)
    fp = stats.fingerprint
    # a bare decoder (no adapter) is its own family: its config's model_type
    family = family or str(getattr(decoder.config, "model_type", None) or "decoder")
    model = {"fingerprint": fp, "family": family, "model_name": model_name}
    cache = cache if cache is not None else ValidationCache()
    if policy == "adaptive":
        vbar = _bar(progress, max_validations, "validate")
        sched = solve(decoder, stats, holdout_batches, fidelity=fidelity, flops_budget=flops_budget, max_cuts=max_cuts,
                      max_validations=max_validations, seed=seed, progress=lambda c: vbar.update(1), cache=cache,
                      rules=rules)
        vbar.close()
        sched.fingerprint, sched.family, sched.model_name = fp, family, model_name
    else:
        sched = peer_schedule(policy, arch["num_layers"], like=like, seed=seed, arch=arch,
                              tokens=(stats.mean_spatial_tokens(), stats.mean_text_tokens()), **model)
        fl = schedule_flops(arch, sched, stats.mean_spatial_tokens(), stats.mean_text_tokens())
        sched.predicted = {k: fl[k] for k in ("flops_ratio", "spatial_tokens", "text_tokens", "tokens_per_layer")}
        sched.predicted["formula"] = FORMULA
        n_rows = distributed.total(sum(b.batch_size for b in holdout_batches))
        sched.calibration = {"samples": stats.samples, "holdout_rows": n_rows, "seed": seed}
        if n_rows:
            sched.calibration["fidelity"] = {"metric": "greedy_next_token_agreement",
                                             **public(cache.measure(decoder, holdout_batches, sched))}
    sched.calibration["precision"] = precision(decoder, holdout_batches, sched, cache)
    return sched


def precision(decoder, holdout_batches: list, schedule: Schedule, cache) -> dict:
    """Where the calibration computed and how close its answers came to flipping: the device and
    dtype of the decoder's layers, and the smallest gap between the unpruned model's two best
    next-token logits among the held-back rows where the schedule agrees with it (near-ties are the
    answers a change of precision flips)."""
    p = next(spec_for(decoder).layers(decoder).parameters())
    layers = getattr(cache, "layers", None)
    out = {"device": str(layers.device if layers is not None else p.device),
           "dtype": str(p.dtype).removeprefix("torch."), "min_top1_margin": None}
    if not holdout_batches or not distributed.total(sum(b.batch_size for b in holdout_batches)):
        return out
    refs = cache.refs_for(decoder, holdout_batches)
    rows = cache.measure(decoder, holdout_batches, schedule)[ROW_KEY] if schedule.effective_cuts() else None
    gaps = [(t[:, 0] - t[:, 1]).tolist() for t in (r.topk(2, dim=-1).values for r in refs)]
    gaps = [g for batch in distributed.in_order(gaps, lambda g: g) for g in batch]  # every rank's, in row order
    agreeing = [g for g, ok in zip(gaps, rows if rows is not None else [True] * len(gaps)) if ok]
    out["min_top1_margin"] = round(min(agreeing), 6) if agreeing else None
    return out


def load_stats(path: str) -> CalibrationStats:
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a calibration directory; run `adatoken-compile calibrate --out {path}` first")
    return CalibrationStats.load(path)


def calibrate_from_stats(decoder, shards: list, holdout: Iterable, *, policy: str = "adaptive",
                         fingerprint: str | None = None, **kw) -> tuple[Schedule, CalibrationStats]:
    """Merge the statistics of several calibration runs (disjoint shards, e.g. from several machines) and
    derive the schedule from the merged statistics, validating on ``holdout`` batches."""
    if not shards:
        raise InputError("calibrate --merge: no statistics to merge")
    stats = shards[0]
    for other in shards[1:]:
        stats = merge(stats, other)
    if fingerprint is not None and stats.fingerprint != fingerprint:
        raise InputError(f"calibrate --merge: statistics are for model {stats.fingerprint[:12]}, not this one "
                         f"({fingerprint[:12]}); calibrate this model")
    rows, bs = _rows(decoder, holdout)
    batches = [b for b, _, _ in _batches([(r, None) for r, _ in rows], distributed.first(bs))]
    kw.pop("like", None) if policy not in LIKE_POLICIES else None
    sched = derive_schedule(decoder, stats, batches, policy=policy, **kw)
    sched.calibration["merged_shards"] = len(shards)
    return sched, stats


def _bar(progress, total, desc):
    return tqdm(total=total, desc=desc, unit="sample" if desc == "calibrate" else "candidate",
                disable=not progress or not distributed.is_main())


def write_calibration(out_dir: str, schedule: Schedule, stats: CalibrationStats, report: bool = True,
                      overwrite: bool = False) -> str:
    """Write DIR/schedule.json, DIR/stats.npz+json and (``report``) DIR/report.md/.json + PNGs.

    Atomic (:func:`adatoken_compile.io.atomic_dir`): an existing DIR is replaced only when it is an
    earlier calibration output and ``overwrite`` is given; on any failure DIR is left as it was.
    """
    if schedule.fingerprint is not None and stats.fingerprint is not None and schedule.fingerprint != stats.fingerprint:
        raise InputError(f"{out_dir}: schedule (model {schedule.fingerprint[:12]}) and statistics (model {stats.fingerprint[:12]}) "
                         "come from different models; calibrate them together")
    if schedule.num_layers != stats.arch["num_layers"]:
        raise InputError(f"{out_dir}: schedule has {schedule.num_layers} layers, statistics {stats.arch['num_layers']}")
    with atomic_dir(out_dir, "calibration", overwrite=overwrite) as tmp:
        schedule.save(os.path.join(tmp, "schedule.json"))
        stats.save(tmp)
        if report:
            write_report(tmp, schedule, stats)
    return os.path.abspath(out_dir)
