"""Patching: tissue, then a grid of patches at a physical resolution, for every slide."""

from slidemil.patching.run import PatchConfig, PatchSummary, patch, patch_slide

__all__ = ["PatchConfig", "PatchSummary", "patch", "patch_slide"]
