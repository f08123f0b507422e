"""Imports every command module so each registers itself on the app."""

from slidemil.cli import (  # noqa: F401
    demo_command,
    encoders_command,
    evaluate_command,
    export_command,
    extract_command,
    heatmap_command,
    patch_command,
    predict_command,
    sweep_command,
    synth_command,
    train_command,
    view_command,
)
