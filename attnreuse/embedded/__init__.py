"""The embedded default model (class-conditional digits) and its pipeline."""
from .model import DigitsPipeline, load_default, make_scheduler

__all__ = ["DigitsPipeline", "load_default", "make_scheduler"]
