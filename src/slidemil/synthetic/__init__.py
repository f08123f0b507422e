"""Synthetic cohorts of real Aperio SVS slides with known lesions, for demos, tests, benchmarks."""

from slidemil.formats.pyramid_tiff import write_pyramid
from slidemil.synthetic.cohort import SynthConfig, class_names, load_truth, plan_cohort, synth
from slidemil.synthetic.scene import SlideScene, make_scene

__all__ = [
    "SlideScene",
    "SynthConfig",
    "class_names",
    "load_truth",
    "make_scene",
    "plan_cohort",
    "synth",
    "write_pyramid",
]
