"""Calibration: hooks that record the inputs of targeted layers per expert and per timestep bin."""

from wanexp.calib.collect import ActivationCollector, CalibStats

__all__ = ["ActivationCollector", "CalibStats"]
