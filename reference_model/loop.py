"""A training run of llava3d-tiny from scratch on CPU: stage 1 (``vision``), stage 2's optimizer
steps over the training scenes (``decoder``), then the checkpoint in the released LLaVA-3D layout
with its TRAINING.json, and its accuracy on the fixed CI sample recorded there.

Nothing in training asks for sparse attention or token dropping: any redundancy the compiler
measures later comes from learning the task.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from adatoken_compile.errors import InputError
from reference_model.config import TrainConfig
from reference_model.decoder import Stage2Modules, build_stage2, question_blocks, record_answers, scene_loss, scene_tokens
from reference_model.prefetch import ScenePrefetch
from reference_model.progress import Metrics, log
from reference_model.scenes import VISION_SEED_OFFSET, SceneCache, count_answer_weights, scene_entry
from reference_model.schedule import StepPlan, curriculum_templates, learning_rate
from reference_model.text import Vocabulary, training_tokenizer
from reference_model.vision import lent_tower_provenance, stage1_settings, vision_stage

LOG_EVERY = 25  # optimizer steps


class Stage2Run:
    """Stage 2's loop: visits the training scenes in a seeded order, epoch after epoch, one
    optimizer step per ``--scenes-per-step`` scenes. The first epoch renders each scene and keeps
    its tower features in memory (about 1.3 MB a scene) for the later ones; with ``--workers`` the
    rendering runs ahead in background processes, which lend their cores back once every scene is
    cached."""

    def __init__(self, cfg: TrainConfig, modules: Stage2Modules, vocab: Vocabulary, vision):
        from adatoken_compile.benchmark3d.dataset import SPLITS
        from adatoken_compile.benchmark3d.world import make_world
        from adatoken_compile.models.testing import CLIP_MEAN, CLIP_STD

        self.cfg, self.m, self.vocab, self.plan = cfg, modules, vocab, StepPlan.of(cfg)
        self.cache = SceneCache(vision, CLIP_MEAN, CLIP_STD)
        self.train_lo = SPLITS["train"][0]
        self.count_w = count_answer_weights([make_world(self.train_lo + i) for i in range(cfg.data.scenes)]) \
            if cfg.loss.count_balance else None
        if self.count_w:
            log("counting-question loss weights by answer: " + ", ".join(f"{a}: {w:.2f}" for a, w in self.count_w.items()))
        self.feats: dict[int, tuple | None] = {}
        self.order = np.random.default_rng(cfg.stage2_seed).permutation(cfg.data.scenes)
        self.step, self.seen, self.skipped = 0, 0, 0
        self.metrics = Metrics()
        self.vision, self.prefetch, self.threads = vision, None, torch.get_num_threads()

    def run(self, opt, t_start: float) -> None:
        cfg, plan = self.cfg, self.plan
        t_stage = time.time()
        opt.zero_grad()
        self.m.lm.train()
        self._start_prefetch()
        try:
            while self.step < plan.total:
                entry = self._entry(self.train_lo + int(self.order[self.seen % cfg.data.scenes]))
                qs = self._questions(entry)
                if not qs:
                    continue
                self._train_on(entry, qs)
                if self.seen % cfg.schedule.scenes_per_step:
                    continue  # gradient accumulation: one optimizer step per scenes_per_step scenes
                lr = self._optimizer_step(opt, t_start, t_stage)
                if self.step % LOG_EVERY == 0:
                    log(self.metrics.line(self.step, plan.total, LOG_EVERY * cfg.schedule.scenes_per_step,
                                          bool(cfg.loss.dense_answer), lr, time.time() - t_stage))
                if cfg.schedule.minutes is not None and time.time() - t_start > cfg.schedule.minutes * 60:
                    log(f"time budget of {cfg.schedule.minutes} min reached at step {self.step}")
                    break
        finally:
            if self.prefetch:
                self.prefetch.close()
            torch.set_num_threads(self.threads)

    def _start_prefetch(self) -> None:
        workers = self.cfg.workers
        if not workers:
            return
        self.prefetch = ScenePrefetch(self.vision, [self.train_lo + int(j) for j in self.order], workers,
                                      self.cfg.data.relation_draws, self.cfg.data.templates, "instance" in self.m.heads)
        if self.threads > 1:  # the workers' cores are lent back after the first epoch
            torch.set_num_threads(max(1, self.threads - workers))
            log(f"first epoch: training on {torch.get_num_threads()} thread(s) while {workers} worker(s) render")

    def _entry(self, scene_seed: int):
        """The scene's entry: cached, from a prefetch worker, or rendered here (first epoch)."""
        if self.prefetch and self.prefetch.done and scene_seed in self.feats:
            self.prefetch.close()  # every scene is cached: nothing is rendered any more
            self.prefetch = None
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
                log(f"first epoch done at step {self.step}: training on {self.threads} threads")
        if scene_seed not in self.feats:  # None: no question of --templates, nothing rendered
            self.feats[scene_seed] = self.prefetch.get(scene_seed) if self.prefetch else \
                scene_entry(self.cache, scene_seed, self.cfg.data.relation_draws, self.cfg.data.templates,
                            "instance" in self.m.heads)
        return self.feats[scene_seed]

    def _questions(self, entry) -> list:
        """The entry's questions of the templates trained at this step; [] skips the scene (an
        error when a whole epoch of scenes was skipped)."""
        templates = self.cfg.data.templates
        active = curriculum_templates(self.cfg.schedule.template_stages, self.plan.per_template_stage, self.step)
        qs = [] if entry is None else entry[1][0] if active is None else [q for q in entry[1][0] if q.template in active]
        if qs:
            self.skipped = 0
            return qs
        self.seen += 1
        self.skipped += 1
        if self.skipped > self.cfg.data.scenes:
            raise InputError(f"train: no training scene has a question of the templates {', '.join(templates)}"
                             if entry is None else "train: no training scene has a question of the curriculum stage "
                             f"{', '.join(sorted(active))}; put a template that every scene asks (exist, count) first")
        return []

    def _train_on(self, entry, qs) -> None:
        """Forward and backward of one scene with the questions ``qs``."""
        cfg, info = self.cfg, entry[1][1]
        tokens = scene_tokens(entry, self.m.pe, self.step, cfg, self.plan)
        blocks = question_blocks(qs, self.vocab, info, cfg.loss, self.count_w)
        loss, logits, packed = scene_loss(self.m, self.vocab, tokens, blocks, info, cfg.loss, bool(self.count_w),
                                          self.metrics)
        (loss / cfg.schedule.scenes_per_step).backward()
        self.seen += 1
        self.metrics.losses.append(loss.item())
        record_answers(self.metrics, logits, packed, blocks)

    def _optimizer_step(self, opt, t_start: float, t_stage: float) -> float:
        """Clip, set the learning rate, step; returns the rate."""
        s = self.cfg.schedule
        torch.nn.utils.clip_grad_norm_(self.m.params, 1.0)
        # under --minutes the decay follows the share of the wall-time budget used when that is further along
        wall = None if s.minutes is None else (time.time() - t_stage) / max(1.0, s.minutes * 60 - (t_stage - t_start))
        lr = learning_rate(self.step, self.plan, s.lr, s.lr_decay_frac, wall)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.step()
        opt.zero_grad()
        self.step += 1
        return lr


def provenance(cfg: TrainConfig, run: Stage2Run, vision_settings: dict, vision_stats: dict, t_start: float,
               command: str) -> dict:
    """TRAINING.json: the command, the seeds and data, and every setting a retraining needs."""
    s, loss, plan, lo = cfg.schedule, cfg.loss, run.plan, run.train_lo
    stages = s.template_stages
    return {
        "command": command,
        "seed": cfg.seed,
        "decoder_seed": cfg.stage2_seed,
        "data": {"generator": "adatoken_compile.benchmark3d (procedural rooms)", "split": "train",
                 "scene_seeds": [lo, lo + cfg.data.scenes - 1],
                 "vision_scene_seeds": [lo + VISION_SEED_OFFSET, lo + VISION_SEED_OFFSET + cfg.vision.scenes - 1]},
        "vision_pretraining": {**vision_settings, **vision_stats},
        "decoder_training": {
            "steps": run.step, "epochs": s.epochs, "lr": s.lr, "lr_decay_frac": s.lr_decay_frac,
            "final_loss": float(np.mean(run.metrics.losses[-50:])), "embed_std": cfg.decoder.embed_std,
            "aux_weight": loss.aux_weight,
            "curriculum": {"views": s.curriculum_views, "steps": plan.curriculum} if s.curriculum_views else None,
            "bg_curriculum_steps": plan.bg, "bg_keep_max": s.bg_keep_max, "bg_hold_steps": plan.hold or None,
            "templates": cfg.data.templates, "dense_answer": loss.dense_answer, "dense_from": loss.dense_from,
            "relation_draws": cfg.data.relation_draws, "count_balance": run.count_w,
            "locate": loss.locate.record(), "instance_marker": loss.instance.record(),
            "position_weight": loss.position_weight or None,
            "pe_scale": cfg.decoder.pe_scale if cfg.decoder.pe_scale != 1.0 else None,
            "distance": loss.distance.record(), "candidate_distance": loss.candidate_distance.record(),
            "compare": loss.compare.record(), "rope_theta": cfg.decoder.rope_theta,
            "scenes_per_step": s.scenes_per_step, "align_weight": loss.align_weight,
            "template_curriculum": {"stages": [list(t) for t in stages], "steps_per_stage": plan.per_template_stage}
            if stages else None},
        "wall_minutes": round((time.time() - t_start) / 60, 1),
        "torch": torch.__version__,
    }


def train(out_dir: str, cfg: TrainConfig, command: str | None = None) -> dict:
    """Train, save the checkpoint to ``out_dir`` and record its CI-sample accuracy; returns the
    provenance written to TRAINING.json (``command``: the command that ran, default this
    process's arguments)."""
    from adatoken_compile.models.testing import save_llava3d
    from reference_model.train import command_line

    cfg.validate()
    v = cfg.vision
    if v.cache and os.path.isdir(v.cache):  # a model folder's tower: refused before any work if it does not fit
        lent_tower_provenance(v.cache, stage1_settings(cfg.seed, v.scenes, v.steps, v.object_weight, v.views))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t_start = time.time()
    tok = training_tokenizer()
    log(f"tokenizer: {tok.vocab_size} tokens")
    vision, vision_settings, vision_stats = vision_stage(cfg.seed, v.scenes, v.steps, v.object_weight, v.views, v.cache,
                                                         cfg.workers)
    m = build_stage2(tok, cfg)
    log(f"decoder params {sum(p.numel() for p in m.lm.parameters())/1e6:.2f}M")
    opt = torch.optim.AdamW(m.params, lr=cfg.schedule.lr, weight_decay=0.01, betas=(0.9, 0.98))
    run = Stage2Run(cfg, m, Vocabulary.of(tok), vision)
    run.run(opt, t_start)
    m.lm.eval()
    prov = provenance(cfg, run, vision_settings, vision_stats, t_start, command or command_line(sys.argv[1:]))
    save_llava3d(out_dir, m.lm, vision, m.pe, m.proj, tok, extra={"adatoken_training": prov})
    with open(os.path.join(out_dir, "TRAINING.json"), "w") as f:
        json.dump(prov, f, indent=2)
    log(f"saved {out_dir} after {prov['wall_minutes']} min")
    record_eval(out_dir)
    return prov


def record_eval(model_dir: str, limit: int = 50) -> dict:
    """Evaluate a saved checkpoint through the real adapter on the fixed CI sample
    (``iter_samples("test", limit=50)``) and record the result in its TRAINING.json."""
    from adatoken_compile.benchmark3d.dataset import iter_samples
    from adatoken_compile.evaluation.accuracy import evaluate
    from adatoken_compile.evaluation.answers import reference_answer_fn
    from adatoken_compile.models.llava3d import Llava3DAdapter

    res = evaluate(reference_answer_fn(Llava3DAdapter(model_dir)), list(iter_samples("test", limit=limit)))
    path = os.path.join(model_dir, "TRAINING.json")
    with open(path) as f:
        prov = json.load(f)
    prov["ci_sample_eval"] = {"split": "test", "limit": limit, "accuracy": res["accuracy"], "n": res["n"],
                              "per_kind": res["per_kind"]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(prov, f, indent=2)
    os.replace(tmp, path)
    log(f"CI-sample accuracy {res['accuracy']:.3f} on {res['n']} test questions")
    return res
