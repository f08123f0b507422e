"""``ExportConfig``: the options of ``slidemil export``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slidemil.config import StageConfig


class ExportConfig(StageConfig):
    """Options of ``slidemil export``."""

    format: Literal["onnx", "torchscript"] = Field(
        "onnx", description="onnx (ONNX Runtime, any language) or torchscript (torch.jit.load)"
    )
    fold: int | None = Field(
        None, ge=0, description="export this fold's model only (default: every fold, averaged)"
    )
    opset: int = Field(18, ge=17, description="ONNX opset version")
    calibrate: Literal["none", "temperature"] = Field(
        "none",
        description="'temperature': put each fold's temperature (fitted by `slidemil evaluate RUN "
        "--calibrate temperature`) into the graph",
    )
