"""The one table of export formats: target names, suffixes, defaults, tolerances, packages.

The CLI's `--target` choices, the artifact names, the sidecar's version fields and the docs
all read this table, so a new target is one row here plus one module next to this file.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """Parity rule against the PyTorch deploy form: max|Δ| / max|ref| <= rel (+ same top-5)."""

    rel: float
    same_top5: bool


# fp32 must match the deploy form to float round-off; fp16 to half-precision round-off,
# and must not change the five best classes of any image.
TOLERANCES = {"fp32": Tolerance(1e-4, False), "fp16": Tolerance(1e-2, True)}


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str                   # artifact: <out>/<model>/<stem><suffix>
    module: str                   # mobilehv.export.<module>: convert / verify / op_counts
    precisions: tuple[str, ...]   # the first is the default
    converters: tuple[str, ...]   # distributions whose versions the sidecar and cache key record
    runtime: str | None           # distribution that runs the parity check (None: none on this OS)
    is_directory: bool = False    # an .mlpackage is a folder
    description: str = ""

    @property
    def default_precision(self) -> str:
        return self.precisions[0]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("coreml", ".mlpackage", "coreml", ("fp16", "fp32"), ("coremltools",), "coremltools",
           is_directory=True,
           description="Core ML ML Program for iOS/macOS apps: RGB image in, class labels out"),
    Format("onnx", ".onnx", "onnx", ("fp32",), ("onnxscript", "onnx", "onnxsim"), "onnxruntime",
           description="self-contained ONNX (opset >= 18), simplified, for onnxruntime"),
    Format("tflite", ".tflite", "tflite", ("fp32",), ("litert-torch",), "ai-edge-litert",
           description="TFLite flatbuffer converted by litert-torch, for LiteRT on Android"),
)}
TARGETS = tuple(FORMATS)
