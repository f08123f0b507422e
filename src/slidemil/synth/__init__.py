"""Synthetic cohorts of real Aperio SVS slides with known lesions, for demos, tests, benchmarks."""

from slidemil.synth.cohort import SynthConfig, class_names, load_truth, plan_cohort, synth
from slidemil.synth.scene import SlideScene, make_scene
from slidemil.synth.svs import write_svs

__all__ = [
    "SlideScene",
    "SynthConfig",
    "class_names",
    "load_truth",
    "make_scene",
    "plan_cohort",
    "synth",
    "write_svs",
]
