"""Core ML: an ML Program `.mlpackage` an iOS app bundles as is.

Input `image`: an RGB ImageType at the model's resolution with the training normalisation
built in. Core ML applies one scale and a per-channel bias to the pixels (`s * x + b_c`);
ImageNet normalisation `(x / 255 - mean_c) / std_c` has a per-channel scale, so the part a
single scale cannot express is a per-channel multiply at the start of the graph:

    s = 1 / (255 * σ),  b_c = -mean_c / σ,  k_c = σ / std_c      (σ = mean of the stds)
    k_c * (s * x + b_c) = x / (255 * std_c) - mean_c / std_c      ✓

(k is 1 for models with one std for all channels, and then the multiply is left out.)
Output: with labels, a classifier (`classLabel`, `classLabel_probs` = softmax probabilities,
as Vision's `VNClassificationObservation` expects); with `labels=False`, `logits`.

Converted from the torch.export ExportedProgram (torch.jit.trace of these models trips
coremltools 9.0 on torch 2.13). Prediction needs macOS: on Linux `verify` checks the spec
(input, outputs, preprocessing constants, op inventory) and records that parity did not run.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilehv.export._common import compare
from mobilehv.export.formats import TOLERANCES

INPUT_NAME, LABEL_NAME, PROBS_NAME, LOGITS_NAME = "image", "classLabel", "classLabel_probs", "logits"
LICENSE = "Apache-2.0 (mobilehv code); the weights keep the license of their source checkpoint"


def preprocessing(mean, std) -> tuple[float, list[float], list[float] | None]:
    """ImageType scale `s`, bias `b` and the per-channel factor `k` left for the graph."""
    sigma = float(sum(std) / 3)
    k = [sigma / s for s in std]
    return 1.0 / (255.0 * sigma), [-m / sigma for m in mean], (None if np.allclose(k, 1.0, rtol=0, atol=1e-12) else k)


class ImageClassifier(nn.Module):
    """The graph Core ML runs after its pixel scale/bias: `k_c` multiply, model, softmax."""

    def __init__(self, model: nn.Module, channel_scale: list[float] | None, softmax: bool):
        super().__init__()
        self.model = model
        self.softmax = softmax
        self.register_buffer("channel_scale", None if channel_scale is None else
                             torch.tensor(channel_scale, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_scale is not None:
            x = x * self.channel_scale
        y = self.model(x)
        return y.softmax(dim=-1) if self.softmax else y


def convert(deploy: nn.Module, job, path: Path) -> dict:
    import coremltools as ct

    import mobilehv

    scale, bias, k = preprocessing(job.mean, job.std)
    wrapped = ImageClassifier(deploy, k, softmax=job.labels is not None).eval()
    # what the wrapped graph receives from the ImageType: s * pixels + b
    pixels_scaled = job.image.float() * scale + torch.tensor(bias).view(1, 3, 1, 1)
    with torch.no_grad():
        # the math above, checked: the wrapped graph on s*x+b equals the deploy form on (x/255-m)/s
        got, ref = wrapped(pixels_scaled), torch.from_numpy(job.ref)
        ref = ref.softmax(-1) if job.labels is not None else ref
        graph_rel = float((got - ref).abs().max() / ref.abs().max())
        if graph_rel > TOLERANCES["fp32"].rel:  # fp32 round-off of the reordered arithmetic
            raise ValueError(f"built-in normalisation is off: max rel error {graph_rel:.3g} vs the deploy form")
        program = torch.export.export(wrapped, (pixels_scaled,)).run_decompositions({})
    kwargs = {}
    if job.labels is not None:
        kwargs["classifier_config"] = ct.ClassifierConfig(list(job.labels), predicted_feature_name=LABEL_NAME)
    else:
        kwargs["outputs"] = [ct.TensorType(name=LOGITS_NAME)]
    model = ct.convert(
        program,
        inputs=[ct.ImageType(name=INPUT_NAME, shape=tuple(job.image.shape), scale=scale, bias=bias,
                             color_layout=ct.colorlayout.RGB)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if job.precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, job.deployment_target),
        skip_model_load=sys.platform != "darwin",
        **kwargs)
    res = f"{job.resolution}x{job.resolution}"
    model.short_description = (f"{job.name} ({job.family}: {job.paper}) image classifier, {job.layout} "
                               f"layout, {res} RGB input, exported and checked by mobilehv")
    model.author = "mobilehv"
    model.license = LICENSE
    model.version = mobilehv.__version__
    model.user_defined_metadata.update({
        "mobilehv.model": job.name, "mobilehv.family": job.family, "mobilehv.layout": job.layout,
        "mobilehv.resolution": str(job.resolution), "mobilehv.precision": job.precision,
        "mobilehv.mean": str(list(job.mean)), "mobilehv.std": str(list(job.std)),
        "mobilehv.weights_sha256": job.weights_sha256})
    model.input_description[INPUT_NAME] = f"RGB image, {res}; normalisation is built in"
    if job.labels is not None:
        model.output_description[LABEL_NAME] = "most likely class"
        model.output_description[PROBS_NAME] = f"probability of each of the {len(job.labels)} classes"
    else:
        model.output_description[LOGITS_NAME] = f"logits ({job.num_classes} classes)"
    model.save(str(path))
    outputs = ({"classLabel": "string", "classLabel_probs": "dictionary label -> probability"}
               if job.labels is not None else {LOGITS_NAME: [1, job.num_classes]})
    return {"input": {"name": INPUT_NAME, "type": "ImageType RGB", "size": [job.resolution, job.resolution],
                      "preprocessing": {"scale": scale, "bias": bias, "channel_scale_in_graph": k},
                      "note": "pass the image as is; the normalisation is built in"},
            "output": outputs, "deployment_target": job.deployment_target,
            "normalisation_check_max_rel": graph_rel,
            "attribution": {"how": "none kept: Core ML op names are converter-generated"}}


def _spec(path: Path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def _block(spec):
    fn = spec.mlProgram.functions["main"]
    return fn.block_specializations[fn.opset]


def _const_values(block) -> dict[str, list[float]]:
    vals = {}
    for op in block.operations:
        if op.type == "const" and "val" in op.attributes:
            t = op.attributes["val"].immediateValue.tensor
            if t.HasField("floats"):
                vals[op.outputs[0].name] = list(t.floats.values)
    return vals


def check_spec(path: Path, job) -> list[str]:
    """What can be verified without the Core ML runtime; raises on the first violation."""
    spec = _spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"expected an ML Program, got {spec.WhichOneof('Type')}")
    (inp,) = spec.description.input
    image = inp.type.imageType
    if inp.name != INPUT_NAME or inp.type.WhichOneof("Type") != "imageType" or \
            (image.width, image.height) != (job.resolution, job.resolution) or image.colorSpace != image.RGB:
        raise ValueError(f"input is not an RGB {job.resolution}x{job.resolution} image named {INPUT_NAME!r}")
    outs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    want = ({LABEL_NAME: "stringType", PROBS_NAME: "dictionaryType"} if job.labels is not None
            else {LOGITS_NAME: "multiArrayType"})
    if outs != want:
        raise ValueError(f"outputs {outs} != {want}")
    block = _block(spec)
    types = Counter(op.type for op in block.operations)
    if job.labels is not None and types["classify"] != 1:
        raise ValueError("no classify op for the class labels")
    consts = _const_values(block)
    scale, bias, _ = preprocessing(job.mean, job.std)
    got_scale = next((consts.get(a.name) for op in block.operations if op.outputs[0].name == "image__scaled__"
                      for a in op.inputs["y"].arguments), None)
    got_bias = next((consts.get(a.name) for op in block.operations if op.outputs[0].name == "image__biased__"
                     for a in op.inputs["y"].arguments), None)
    got_bias = [0.0, 0.0, 0.0] if got_bias is None else got_bias  # a zero bias adds no op
    if got_scale is None or not np.allclose(got_scale, scale, rtol=1e-6) or \
            not np.allclose(np.ravel(got_bias), bias, rtol=1e-6):
        raise ValueError(f"image preprocessing constants {got_scale}, {got_bias} != {scale}, {bias}")
    return [f"ML Program, opset {_spec_opset(spec)}",
            f"input {INPUT_NAME!r}: RGB image {job.resolution}x{job.resolution}",
            f"outputs: {', '.join(outs)}",
            f"pixel scale {scale:.6g} and bias {[round(b, 6) for b in bias]} in the graph",
            f"{sum(n for t, n in types.items() if t != 'const')} ops"]


def _spec_opset(spec) -> str:
    return spec.mlProgram.functions["main"].opset


def verify(path: Path, job) -> dict:
    checks = check_spec(path, job)
    if sys.platform != "darwin":
        return {"ran": False, "reason": "numerical parity needs macOS (Core ML predictions run only there); "
                                         "verified on this OS: " + "; ".join(checks)}
    import coremltools as ct
    from PIL import Image

    model = ct.models.MLModel(str(path))
    image = Image.fromarray(job.image[0].permute(1, 2, 0).numpy(), mode="RGB")
    out = model.predict({INPUT_NAME: image})
    if job.labels is not None:
        got = np.array([[out[PROBS_NAME][name] for name in job.labels]])
        ref = torch.from_numpy(job.ref).softmax(-1).numpy()
    else:
        got, ref = np.asarray(out[LOGITS_NAME]), job.ref
    record = compare(got, ref, job.tolerance, f"Core ML {ct.__version__} (macOS, compute units ALL)")
    record["checks"] = checks
    return record


def op_counts(path: Path) -> Counter:
    return Counter(op.type for op in _block(_spec(path)).operations if op.type != "const")
