"""Plain cross-entropy on the labels: the independent student, and every teacher."""

from registry import register_method
from runs import train

register_method("ce", source="plain cross-entropy on the labels", needs_teacher=False, run=train)(None)
