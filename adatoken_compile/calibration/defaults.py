"""How many held-back questions validate a schedule when the caller does not say: one definition for
the calibration engine (:func:`adatoken_compile.calibration.api.calibrate`), the package API, the
CLI and the main job."""

from __future__ import annotations

HOLDOUT = 384  # other questions that validate candidate schedules (agreement with the unpruned model)
# with a rule search: rules at the same counts differ by 1-2 points of agreement, which the ~2-point
# 95% interval of 384 rows cannot resolve (llava3d-tiny at an 80% cut: 384 rows chose a rule 1.7
# test points behind the one that 1,536 rows chose)
RULES_HOLDOUT = 1536


def default_holdout(searching_rules) -> int:
    """Held-back questions when none are given: ``RULES_HOLDOUT`` while a rule search runs, else
    ``HOLDOUT``. A question file with fewer questions past the statistics' scenes gives what it has."""
    return RULES_HOLDOUT if searching_rules else HOLDOUT
