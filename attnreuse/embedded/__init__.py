"""The embedded default model (class-conditional digits) and its pipeline."""
from .model import CALIBRATION, HELD_OUT, DigitsPipeline, generate, load_default, make_scheduler, searched_schedules

__all__ = ["CALIBRATION", "HELD_OUT", "DigitsPipeline", "generate", "load_default", "make_scheduler",
           "searched_schedules"]
