"""Verified export of the deploy form to Core ML, ONNX and TFLite.

`export(name_or_model, target, out_dir, **options) -> ExportResult`. One table (`FORMATS`)
drives targets, suffixes, default precisions and tolerances; one module per target
(`onnx`, `tflite`, `coreml`) implements `convert(deploy, job, path)`, `verify(path, job)` and
`op_counts(path)`. The converters (onnx, coremltools, litert-torch) are imported inside those
functions only, so `import mobilehv` stays fast.
"""
from mobilehv.export.core import (ExportError, ExportFailed, ExportResult, artifact_stem,
                                  check_options, export)
from mobilehv.export.formats import FORMATS, TARGETS, TOLERANCES, Format, Tolerance

__all__ = ["FORMATS", "TARGETS", "TOLERANCES", "ExportError", "ExportFailed", "ExportResult",
           "Format", "Tolerance", "artifact_stem", "check_options", "export"]
