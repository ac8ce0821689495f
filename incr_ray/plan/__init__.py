"""`incr-ray plan`: per-GPU memory of a run, worked out before anything starts.

Arithmetic on a parameter count and a transformer shape: no weights are loaded and Ray is never
imported. :mod:`.shapes` reads the model, :mod:`.formulas` holds the ZeRO, activation and
DeepSpeed estimates, :mod:`.recommend` picks a layout, :mod:`.render` prints the plan.
"""

from .formulas import Layout, training_precision, zero_model_states
from .recommend import auto_layout, auto_stage
from .render import plan_text
from .shapes import KNOWN_SHAPES, count_parameters, parse_count, resolve_shape

__all__ = [
    "KNOWN_SHAPES", "Layout", "auto_layout", "auto_stage", "count_parameters", "parse_count", "plan_text",
    "resolve_shape", "training_precision", "zero_model_states",
]
