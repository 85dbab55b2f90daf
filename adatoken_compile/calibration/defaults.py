"""How many held-back questions validate a schedule, and which rules are compared, when the caller
does not say: one definition for the calibration engine (:func:`adatoken_compile.calibration.api.calibrate`),
the package API, the CLI and the main job. Torch-free: the CLI reads it before anything loads."""

from __future__ import annotations

HOLDOUT = 384  # other questions that validate candidate schedules (agreement with the unpruned model)
# with a rule search: rules at the same counts differ by 1-2 points of agreement, which the ~2-point
# 95% interval of 384 rows cannot resolve (llava3d-tiny at an 80% cut: 384 rows chose a rule 1.7
# test points behind the one that 1,536 rows chose)
RULES_HOLDOUT = 1536

# the rules every adaptive calibration compares at each chosen cut, cheapest first: the random and
# strided controls, the attention rules that score with one query row (last_token) or the question's
# rows (text_tail), and dedup where its pairwise similarity fits the FLOPs; the first three (and
# dedup) also try one cut before layer 0
DEFAULT_RULES = ("random", "strided", "last_token", "text_tail", "dedup")


def default_holdout(searching_rules) -> int:
    """Held-back questions when none are given: ``RULES_HOLDOUT`` while a rule search runs, else
    ``HOLDOUT``. A question file with fewer questions past the statistics' scenes gives what it has."""
    return RULES_HOLDOUT if searching_rules else HOLDOUT
