"""Calibration: attention observers, additive statistics, schedule solver and peer policies."""
