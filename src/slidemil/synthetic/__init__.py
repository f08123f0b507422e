"""Synthetic cohorts of real Aperio SVS slides with known lesions, for demos, tests, benchmarks."""

from slidemil.formats.pyramid_tiff import write_pyramid
from slidemil.synthetic.cohort import SynthConfig, class_names, load_truth, plan_cohort, synth
from slidemil.synthetic.scene import SlideScene, make_scene
from slidemil.synthetic.sites import SiteStain, make_site_stains

__all__ = [
    "SiteStain",
    "SlideScene",
    "SynthConfig",
    "class_names",
    "load_truth",
    "make_scene",
    "make_site_stains",
    "plan_cohort",
    "synth",
    "write_pyramid",
]
