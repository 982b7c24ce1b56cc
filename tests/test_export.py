"""Export to Core ML / ONNX / TFLite with the real converters and runtimes.

Default run: the smallest variant (by params) of every family in the registry x three targets,
at a reduced resolution where the input rule allows. Full matrix (every variant x every
target, default resolution): `python -m pytest tests/test_export.py -m full`.
"""
from __future__ import annotations

import ast
import json
import sys
import time
from collections import defaultdict

import pytest
import torch
from typer.testing import CliRunner

import mobilehv
from mobilehv.checkpoints import CheckpointError
from mobilehv.cli import app
from mobilehv.export import FORMATS, TARGETS, ExportError, ExportFailed, export
from mobilehv.export._common import normalise, parity_image, sha256_path
from mobilehv.export.coreml import preprocessing
from mobilehv.export.labels import imagenet_labels
from mobilehv.registry import ResolutionError, UnknownModelError, get_spec, list_models
from mobilehv.taxonomy import is_data_movement

FIRST = ("mobilenetv2", "poolformer", "mobilevit")  # the reference points run first


def _params(name: str) -> float:
    spec = get_spec(name)
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in spec.builder(layout=spec.family.layouts[0]).parameters())
    except Exception:  # a broken builder still gets its family's export test, which then fails
        return float("inf")


def _families() -> dict[str, list[str]]:
    """Family -> its variants, smallest first; families are added by other modules at will."""
    by_family = defaultdict(list)
    for name in list_models():
        by_family[get_spec(name).family.name].append(name)
    order = sorted(by_family, key=lambda f: (FIRST.index(f) if f in FIRST else len(FIRST), f))
    return {f: sorted(by_family[f], key=lambda n: (_params(n), n)) for f in order}


FAMILIES = _families()
SMALLEST = [variants[0] for variants in FAMILIES.values()]
ALL = [n for variants in FAMILIES.values() for n in variants]


def small_resolution(name: str) -> int:
    """The smallest size >= 64 the input rule accepts (the fixed size where there is one)."""
    rule = get_spec(name).input_rule
    if rule.fixed:
        return rule.fixed
    return -(-max(rule.minimum, 64) // rule.multiple) * rule.multiple


def test_reference_families_come_first():
    present = [f for f in FIRST if f in FAMILIES]
    assert "mobilenetv2" in present and list(FAMILIES)[:len(present)] == present


def check_artifact(result, name: str, target: str, resolution: int) -> dict:
    """What every export must hold: artifact + sidecar in place, hash, ops, parity record."""
    fmt = FORMATS[target]
    assert result.ok and not result.cached and result.errors == []
    assert result.path.exists() and result.path.name.endswith(fmt.suffix)
    assert result.path.parent.name == name
    assert [p.name for p in result.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    info = json.loads(result.sidecar.read_text())
    assert result.sidecar.name == result.path.name + ".json"
    assert (info["model"], info["target"], info["layout"], info["folded"]) == (name, target, "nchw", True)
    assert (info["resolution"], info["batch"], info["precision"]) == (resolution, 1, fmt.default_precision)
    assert {"mobilehv", "torch", *fmt.converters} <= set(info["versions"])
    assert info["artifact"]["sha256"] == sha256_path(result.path)
    assert info["artifact"]["size_bytes"] == result.size_bytes > 0
    ops = info["ops"]["by_type"]
    assert info["ops"]["total"] == sum(ops.values()) > 0
    assert info["ops"]["data_movement"] == sum(n for op, n in ops.items() if is_data_movement(op))
    parity = info["parity"]
    if target == "coreml" and sys.platform != "darwin":
        assert parity["ran"] is False and "needs macOS" in parity["reason"]
    else:
        assert parity["ran"] and parity["passed"], parity
        assert parity["max_rel"] <= (1e-4 if info["precision"] == "fp32" else 1e-2)
    return info


def check_onnx(result) -> None:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not any(p.suffix not in (".onnx", ".json", ".mlpackage", ".tflite")
                   for p in result.path.parent.iterdir())  # one self-contained file
    # module attribution survives onnxsim (the profiler reads it)
    scopes = [next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
              for n in model.graph.node]
    assert sum(s is not None for s in scopes) >= 0.8 * len(scopes), "node attribution lost"
    assert any(len(ast.literal_eval(s)) > 2 for s in scopes if s), "no op attributed below the root"
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]


def check_tflite(result, resolution: int) -> None:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(result.path))
    assert list(it.get_input_details()[0]["shape"]) == [1, 3, resolution, resolution]
    names = [t["name"] for t in it.get_tensor_details()]
    assert sum("/" in n for n in names) > 0.3 * len(names), "module paths missing from tensor names"


def check_coreml(result, info: dict, resolution: int) -> None:
    import coremltools as ct

    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.imageType.width == resolution
    assert inp.type.imageType.colorSpace == inp.type.imageType.RGB
    assert {o.name for o in spec.description.output} == {"classLabel", "classLabel_probs"}
    meta = spec.description.metadata
    assert meta.userDefined["mobilehv.model"] == info["model"]
    assert meta.userDefined["mobilehv.resolution"] == str(resolution)
    assert meta.userDefined["mobilehv.layout"] == "nchw" and meta.license and meta.versionString
    assert spec.mlProgram.functions["main"].opset == "CoreML6"  # iOS 16
    assert info["input"]["preprocessing"]["scale"] > 0 and info["labels"].startswith("ImageNet-1k")
    assert info["normalisation_check_max_rel"] <= 1e-5


def informative_model(name: str, resolution: int) -> torch.nn.Module:
    """The model with seeded weights whose output depends on the image, as trained weights' does.

    A random init often ignores the input (zero-initialised branch norms, activations that
    shrink layer after layer), so parity would compare constants. Small seeded values for the
    zero-initialised parameters plus BatchNorm statistics calibrated on a few inputs (as a
    trained net has) fix it.
    """
    torch.manual_seed(0)
    model = mobilehv.create_model(name)
    g = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised (branch norms, heads)
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration pass
        model.train()(torch.randn(4, 3, resolution, resolution, generator=g))
        for bn in norms:  # a channel that barely varies on 4 images must not be amplified 100x
            bn.running_var.clamp_(min=1e-2)
        for name, bn in model.named_modules():
            # Attention projections ending in a BatchNorm (LeViT) are tempered: with random weights
            # their scores reach ~1e3, softmax turns chaotic and fp32 differs from fp64 by 0.4 on
            # the parity image, so parity would measure rounding noise, not the export.
            if name.endswith(("qkv.bn", ".q.bn", ".kv.bn")):
                bn.weight.mul_(0.3)
                bn.bias.mul_(0.3)
    return model.eval()


def _run(name: str, target: str, out, resolution: int):
    t = time.perf_counter()
    cpu = time.process_time()
    result = export(informative_model(name, resolution), target, out, resolution=resolution)
    assert result.parity["input_dependent"] and result.notes == []
    info = check_artifact(result, name, target, resolution)
    if target == "onnx":
        check_onnx(result)
    elif target == "tflite":
        check_tflite(result, resolution)
    else:
        check_coreml(result, info, resolution)
    print(f"\nEXPORT {name} {target} {resolution}px: {time.perf_counter() - t:.1f} s wall, "
          f"{time.process_time() - cpu:.1f} s cpu, {result.size_bytes / 1e6:.2f} MB, "
          f"max rel {result.max_error}, {info['ops']['total']} ops ({info['ops']['data_movement']} data movement)")


@pytest.mark.parametrize("name,target", [(n, t) for n in SMALLEST for t in TARGETS])
def test_export_family(name, target, tmp_path):
    _run(name, target, tmp_path, small_resolution(name))


@pytest.mark.full
@pytest.mark.parametrize("name,target", [(n, t) for n in ALL for t in TARGETS])
def test_export_full_matrix(name, target, tmp_path):
    _run(name, target, tmp_path, get_spec(name).resolution)


# --- options, cache, atomicity -------------------------------------------------------------

NAME = SMALLEST[0]
RES = small_resolution(NAME)


def test_cache_reuses_a_matching_artifact(tmp_path):
    first = export(NAME, "onnx", tmp_path, resolution=RES, cache=True)
    mtime = first.path.stat().st_mtime_ns
    t = time.perf_counter()
    second = export(NAME, "onnx", tmp_path, resolution=RES, cache=True)
    assert second.cached and second.path == first.path and time.perf_counter() - t < first.seconds
    assert second.path.stat().st_mtime_ns == mtime and second.info["cache_key"] == first.info["cache_key"]
    # other weights -> other key -> exported again
    model = mobilehv.create_model(NAME)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    third = export(model, "onnx", tmp_path, resolution=RES, cache=True)
    assert not third.cached and third.info["cache_key"] != first.info["cache_key"]
    assert third.info["weights_sha256"] != first.info["weights_sha256"]
    # a tampered artifact is not reused
    third.path.write_bytes(third.path.read_bytes() + b"x")
    assert not export(model, "onnx", tmp_path, resolution=RES, cache=True).cached


def test_failed_parity_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    model = informative_model(NAME, RES)
    with pytest.raises(ExportFailed, match="parity .* failed") as e:
        export(model, "onnx", out, resolution=RES, tolerance=0.0)
    assert e.value.result.errors and e.value.result.path is None
    assert str(e.value).count("\n") == 0
    assert not out.exists()
    # an existing artifact survives a failed re-export untouched
    ok = export(model, "onnx", out, resolution=RES)
    before = {p.name: sha256_path(p) for p in ok.path.parent.iterdir()}
    with pytest.raises(ExportFailed):
        export(model, "onnx", out, resolution=RES, tolerance=0.0)
    assert {p.name: sha256_path(p) for p in ok.path.parent.iterdir()} == before


def test_input_independent_weights_are_flagged(tmp_path):
    model = mobilehv.create_model(NAME)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = export(model, "onnx", tmp_path, resolution=RES)
    assert result.parity["input_dependent"] is False and "compares constants only" in result.notes[0]
    assert json.loads(result.sidecar.read_text())["notes"] == result.notes


def test_coreml_raw_logits_and_names(tmp_path):
    import coremltools as ct

    result = export(NAME, "coreml", tmp_path, resolution=RES, labels=False, precision="fp32")
    assert result.path.name == f"{NAME}_{RES}px_fp32_logits.mlpackage"
    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    (out,) = spec.description.output
    assert out.name == "logits" and out.type.WhichOneof("Type") == "multiArrayType"
    assert result.info["precision"] == "fp32" and result.info["labels"] is None


def test_coreml_normalisation_math():
    """ImageType's one scale + per-channel bias, then the graph's per-channel factor."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    scale, bias, k = preprocessing(mean, std)
    image = parity_image(2, 32)
    built_in = (image.double() * scale + torch.tensor(bias, dtype=torch.double).view(1, 3, 1, 1)) \
        * torch.tensor(k, dtype=torch.double).view(1, 3, 1, 1)
    expected = normalise(image, mean, std).double()
    assert float((built_in - expected).abs().max()) < 1e-6
    assert preprocessing((0.5,) * 3, (0.5,) * 3)[2] is None  # one std: no multiply in the graph


def test_imagenet_labels():
    names = imagenet_labels()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[999] != ""


@pytest.mark.parametrize("kwargs,error,match", [
    ({"target": "caffe"}, ExportError, "unknown target 'caffe'; accepted: coreml, onnx, tflite"),
    ({"model_or_name": "mobilenetv2_10"}, UnknownModelError, "closest"),
    ({"resolution": 50}, ResolutionError, "multiples of"),
    ({"batch": 0}, ExportError, "batch"),
    ({"target": "coreml", "batch": 2}, ExportError, "batch 1"),
    ({"precision": "fp16"}, ExportError, "onnx exports precision fp32"),
    ({"target": "coreml", "deployment_target": "iOS11"}, ExportError, "deployment target"),
    ({"weights": "missing.pth"}, ExportError, "does not exist"),
])
def test_bad_input_is_refused_before_writing(tmp_path, kwargs, error, match):
    args = {"model_or_name": NAME, "target": "onnx", **kwargs}
    with pytest.raises(error, match=match):
        export(args.pop("model_or_name"), args.pop("target"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_labels_file_must_match_classes(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(ExportError, match="2 labels .* 1000 classes"):
        export(NAME, "coreml", tmp_path / "out", resolution=RES, labels=labels)
    assert not (tmp_path / "out").exists()


# --- CLI -----------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_exports_with_table_and_cache(tmp_path):
    args = ["export", NAME, "--target", "onnx", "--resolution", str(RES), "--out", str(tmp_path), "--cache"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert NAME in first.stdout and "ok" in first.stdout and "max error" in first.stdout
    assert (tmp_path / NAME / f"{NAME}_{RES}px.onnx").is_file()
    assert (tmp_path / NAME / f"{NAME}_{RES}px.onnx.json").is_file()
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "cached" in second.stdout


def _bad_cli(tmp_path, *extra, name=NAME):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", name, "--target", "onnx", "--resolution", str(RES),
                                 "--out", str(out), *extra])
    assert result.exit_code != 0
    assert not out.exists()
    return result


@pytest.mark.parametrize("extra,match", [
    (("--batch", "0"), "batch must be"),
    (("--resolution", "50"), "cannot take a 50x50 input"),
    (("--weights", "nope.pth"), "does not exist"),
    (("--labels", "a.txt", "--no-labels"), "exclude each other"),
    (("--target", "coreml", "--deployment-target", "iOS9"), "unknown Core ML deployment target"),
])
def test_cli_bad_options_one_line(tmp_path, extra, match):
    result = _bad_cli(tmp_path, *extra)
    assert match in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_cli_unknown_model_and_target(tmp_path):
    result = _bad_cli(tmp_path, name="mobilenetv2_10")
    assert "closest" in result.stderr and result.stderr.strip().count("\n") == 0
    result = runner.invoke(app, ["export", NAME, "--target", "caffe", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "caffe" in result.output and not (tmp_path / "o").exists()


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["export", NAME, "--target", "onnx", "--out", str(blocker / "sub")])
    assert result.exit_code != 0 and "cannot write to output folder" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and blocker.read_text() == "not a folder"


def test_cli_corrupt_and_foreign_weights(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"definitely not a checkpoint")
    result = _bad_cli(tmp_path, "--weights", str(corrupt))
    assert "cannot read checkpoint" in result.stderr and result.stderr.strip().count("\n") == 0
    other = next(n for n in SMALLEST if n != NAME)
    foreign = tmp_path / "foreign.pth"
    torch.save(mobilehv.create_model(other).state_dict(), foreign)
    result = _bad_cli(tmp_path, "--weights", str(foreign))
    assert f"does not fit {NAME}" in result.stderr and result.stderr.strip().count("\n") == 0
    with pytest.raises(CheckpointError):
        export(NAME, "onnx", tmp_path / "out", weights=foreign)
