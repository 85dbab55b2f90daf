"""Calibration: attention observers, additive statistics, schedule solver and peer policies."""

from adatoken_compile.calibration.api import calibrate, write_calibration

__all__ = ["calibrate", "write_calibration"]
