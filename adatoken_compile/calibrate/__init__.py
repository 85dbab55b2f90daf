"""Calibration: attention observers, additive statistics, schedule solver and peer policies."""

from .api import calibrate, write_calibration

__all__ = ["calibrate", "write_calibration"]
