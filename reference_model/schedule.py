"""When stage 2 does what: its step counts, the learning rate, and the curricula (views, room
voxels, question templates) as functions of the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from reference_model.config import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    """The step counts a run's options come to (all in optimizer steps)."""

    total: int  # optimizer steps
    warm: int  # linear warm-up of the learning rate
    curriculum: int  # steps that see only --curriculum-views views of a scene
    bg: int  # steps over which room voxels are phased in
    hold: int  # steps before which only --bg-keep-max of the room voxels are kept
    per_template_stage: int  # steps of each template-curriculum stage (0: no curriculum)

    @classmethod
    def of(cls, cfg: TrainConfig) -> StepPlan:
        s = cfg.schedule
        total = int(cfg.data.scenes * s.epochs) // s.scenes_per_step
        stages = s.template_stages
        return cls(total=total, warm=min(100, total // 10), curriculum=int(s.curriculum_frac * total),
                   bg=int(s.bg_curriculum * total), hold=int(s.bg_hold * total),
                   per_template_stage=int(s.template_frac * total) // len(stages) if stages else 0)


def lr_factor(progress: float, decay_frac: float | None = None) -> float:
    """Learning-rate multiplier after warm-up at ``progress`` (0..1 of the post-warm-up steps):
    cosine over the whole run (default), or with ``decay_frac`` F constant 1 until 1 - F and a
    cosine to 0 over the last F (warm-up/stable/decay: the answer accuracy of this model climbs
    only after a break-away at ~55-70% of the steps, where a whole-run cosine has already
    halved the rate)."""
    p = min(1.0, progress)
    f = 1.0 if decay_frac is None else decay_frac  # F = 1 is the whole-run cosine, float for float
    start = 1.0 - f
    return 1.0 if p <= start else 0.5 * (1 + math.cos(math.pi * (p - start) / f))


def room_keep_share(step: int, bg_steps: int, hold_steps: int, keep_max: float = 1.0) -> float | None:
    """Share of the floor / wall / ceiling voxels a training step keeps (None: the whole scene;
    object voxels are always kept). --bg-curriculum: the first ``bg_steps`` phase the share in
    from 0 to ``keep_max``, so the question tokens first find objects among a few hundred tokens,
    then among the whole scene. --bg-hold: then ``keep_max`` until step ``hold_steps``; room
    surfaces are ~86% of a scene's voxels and answer no question, so such a step costs about a
    third of a whole-scene step (0.33 vs 1.08 s at share 0.2) and the hour buys more steps. The
    steps after both see whole scenes, as evaluated."""
    if step < bg_steps:
        return keep_max * step / bg_steps
    if step < hold_steps:
        return keep_max
    return None


def curriculum_templates(stages, stage_steps: int, step: int) -> set | None:
    """Templates trained at ``step`` under a template curriculum (None: every template): phase j
    (steps j*stage_steps .. (j+1)*stage_steps) trains on the templates of stages 0..j, cumulatively,
    so the easy look-ups are learned before the whole mixture competes for the same heads."""
    if not stages or stage_steps <= 0 or step >= stage_steps * len(stages):
        return None
    return set().union(*stages[: step // stage_steps + 1])


def learning_rate(step: int, plan: StepPlan, lr: float, decay_frac: float | None, wall_progress: float | None = None) -> float:
    """The rate of optimizer step ``step``: a linear warm-up, then ``lr_factor`` of the progress,
    the share of the post-warm-up steps done or, under a wall-time budget, the share of the budget
    used (``wall_progress``), whichever is further along."""
    if step < plan.warm:
        return lr * (step + 1) / plan.warm
    prog = (step - plan.warm) / max(1, plan.total - plan.warm)
    if wall_progress is not None:
        prog = max(prog, wall_progress)
    return lr * lr_factor(prog, decay_frac)
