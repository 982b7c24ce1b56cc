"""Profiler: attribution, the runners on the real runtimes, tables, CLI, bad input.

Real runtimes throughout (eager torch, onnxruntime, the LiteRT interpreter); small models and
reduced resolutions keep it fast. What the numbers come out as (the sum of ops against the whole
model, the spread of two profiles) is timing, measured by benchmarks/profile_repeatability.py:
on a shared 2-core machine it moves with the neighbours' load, and the suite runs on two workers.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import mobilehv
from mobilehv.cli import app
from mobilehv.profile import ProfileError, ProfileResult, profile
from mobilehv.profile.attribution import Scope, categorise
from mobilehv.profile.records import OP_COLUMNS, summary_columns
from mobilehv.registry import smallest_per_family
from mobilehv.taxonomy import CATEGORIES

# (model, resolution): one per family the issue names first, then the others, where registered.
CANDIDATES = [("mobilevit_xxs", 256), ("mobile_former_26m", 224), ("efficientformer_l1", 224),
              ("poolformer_s12", 160), ("levit_128", 224), ("deit_tiny", 224), ("mobilenetv2_100", 224)]
REGISTERED = set(mobilehv.list_models())
MODELS = [(n, r) for n, r in CANDIDATES if n in REGISTERED]
runner = CliRunner()


def _layouts(name: str) -> list[str]:
    return mobilehv.model_info(name)["layouts"]


# --- attribution -----------------------------------------------------------------------------

def _chain(*items: tuple[str, str]) -> tuple[Scope, ...]:
    return (Scope("", "pkg.Net"),) + tuple(Scope(p, c) for p, c in items)


def test_module_context_decides_before_op_type():
    ln = _chain(("blocks.0", "pkg.Block"), ("blocks.0.norm1", "mobilehv.layers.layout.LayerNorm2d"))
    assert categorise("ReduceMean", ln) == "norm"          # a LayerNorm's mean is norm, not pooling
    assert categorise("Mul", ln) == "norm"
    gn = _chain(("stages.1.norm", "torch.nn.modules.normalization.GroupNorm"))
    assert categorise("aten.native_group_norm", gn) == "norm"
    stem = _chain(("stem", "pkg.ConvStem"), ("stem.0", "torch.nn.modules.conv.Conv2d"))
    assert categorise("Conv", stem) == "patch_embed"
    assert categorise("Relu", _chain(("patch_embed", "pkg.Thing"), ("patch_embed.act", "x.ReLU"))) == "patch_embed"
    attn = _chain(("blocks.0", "pkg.Block"), ("blocks.0.attn", "mobilehv.layers.blocks.Attention"))
    assert categorise("MatMul", attn) == "attention"
    assert categorise("Softmax", attn) == "attention"
    assert categorise("Transpose", attn) == "reshape"      # data movement stays reshape
    cross = _chain(("blocks.0.mobile_to_former", "mobilehv.models.mobile_former.MobileToFormer"))
    assert categorise("MatMul", cross) == "attention"      # Mobile-Former's cross attention
    qkv = attn + (Scope("blocks.0.attn.qkv", "torch.nn.modules.conv.Conv2d"),)
    assert categorise("Conv", qkv) == "conv"
    assert categorise("MatMul", _chain(("blocks.0.mlp.fc1", "torch.nn.modules.linear.Linear"))) == "linear"
    assert categorise("Add", _chain(("blocks.0", "pkg.Block"))) == "elementwise"
    assert categorise("AveragePool", _chain(("mixer", "pkg.Pooling"))) == "pooling"
    assert categorise("Sub", _chain(("mixer", "pkg.Pooling"))) == "pooling"


class MarkedStem:
    latency_category = "patch_embed"


class MarkedScores:
    attention_scores = True


def test_explicit_class_convention():
    here = __name__
    assert categorise("Conv", _chain(("features.0", f"{here}.MarkedStem"))) == "patch_embed"
    assert categorise("Mul", _chain(("blocks.0.mix", f"{here}.MarkedScores"))) == "attention"
    assert categorise("Mul", _chain(("blocks.0.mix", f"{here}.Unmarked"))) == "elementwise"


def test_summary_takes_each_category_per_run_not_per_op_medians():
    """Two convs that are each slow in a different run: the per-op medians (1 + 1 us) miss the
    typical run's 5 us; the summary takes the category's median over the runs."""
    from mobilehv.profile.records import OpRecord, RunResult, ops_frame, summary_row

    conv = (Scope("", "pkg.Net"), Scope("c", "torch.nn.modules.conv.Conv2d"))
    relu = (Scope("", "pkg.Net"), Scope("r", "torch.nn.modules.activation.ReLU"))
    run = RunResult("net", "torch", "nchw", 32, [
        OpRecord("a", "conv2d", conv, "", [1.0, 1.0, 4.0]),
        OpRecord("b", "conv2d", conv, "", [1.0, 4.0, 1.0]),
        OpRecord("c", "relu", relu, "", [2.0])],  # one value (an estimate): every run
        e2e_ms=[0.007, 0.007, 0.007], method="test")
    row = summary_row(run, ops_frame(run), machine="m", threads=1, warmup=0, repeats=3)
    assert row["conv_ms"] == pytest.approx(0.005) and row["activation_ms"] == pytest.approx(0.002)
    assert row["ops_sum_ms"] == pytest.approx(0.007) and row["ops_vs_e2e_pct"] == pytest.approx(0)
    assert row["conv_pct"] == pytest.approx(100 * 5 / 7, abs=0.01)


# --- runners -----------------------------------------------------------------------------------

def _check_run(result: ProfileResult):
    for _, row in result.summary.iterrows():
        key = f"{row['model']} {row['runtime']} {row['layout']}"
        assert row["attributed_pct"] >= 95, f"{key}: only {row['attributed_pct']}% attributed"
        assert sum(row[f"{c}_pct"] for c in CATEGORIES) == pytest.approx(100, abs=0.1)
        assert 0 < row["e2e_p10_ms"] <= row["e2e_median_ms"] <= row["e2e_p90_ms"]
        assert row["ops_sum_ms"] > 0 and np.isfinite(row["ops_vs_e2e_pct"]), key
    ops = result.ops
    assert list(ops.columns) == list(OP_COLUMNS)
    assert set(ops["category"]) <= set(CATEGORIES)
    assert (ops["median_us"] >= 0).all()


@pytest.mark.parametrize("name,res", MODELS, ids=[m for m, _ in MODELS])
def test_torch_runner(name, res, tmp_path):
    result = profile(name, runtime="torch", layout="both", resolution=res, warmup=2, repeats=4,
                     out=None)
    assert len(result.summary) == len(_layouts(name))
    _check_run(result)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


ORT_MODELS = [m for m in MODELS if m[0] in ("mobilevit_xxs", "mobile_former_26m", "poolformer_s12")]


@pytest.mark.parametrize("name,res", ORT_MODELS, ids=[m for m, _ in ORT_MODELS])
def test_onnxruntime_runner(name, res, export_dir):
    result = profile(name, runtime="onnxruntime", layout="both", resolution=res, warmup=2,
                     repeats=5, out=None, export_dir=export_dir)
    _check_run(result)
    # the fused/optimised ORT graph still maps to modules, down to the stem and the norms
    cats = set(result.ops["category"])
    assert {"patch_embed", "conv"} <= cats


def test_onnxruntime_without_the_nchwc_layout_transformer(export_dir):
    from mobilehv.export import export
    from mobilehv.profile import onnxruntime as ort_runner
    from mobilehv.profile.ort_worker import NCHWC

    path = export("mobile_former_26m", "onnx", export_dir, cache=True).path
    kw = dict(name="mobile_former_26m", layout="nchw", warmup=1, repeats=3)
    reorders = {"ReorderInput", "ReorderOutput"}
    if platform.machine().lower() in ("x86_64", "amd64"):  # where ORT applies it by default
        assert reorders <= {op.op_type for op in ort_runner.run(path, **kw).ops}
    portable = ort_runner.run(path, disabled_optimizers=(NCHWC,), **kw)
    assert not reorders & {op.op_type for op in portable.ops}
    assert NCHWC in portable.method


def test_onnxruntime_keeps_runs_the_os_did_not_interrupt():
    from mobilehv.profile.ort_worker import running_runs

    cpu = [4000.0] * 6
    # a run that lost 3 ms to being descheduled is left out; 40 us and 2 % of a run are not a stall
    assert running_runs([0.0, 40.0, 3000.0, 10.0, 80.0, 0.0], cpu, threads=1) == [0, 1, 3, 4, 5]
    # too few calm runs: the half that lost least
    assert running_runs([900.0, 100.0, 3000.0, 700.0, 5000.0, 600.0], cpu, threads=1) == [1, 3, 5]
    # several threads: kernel times and e2e are both wall time, nothing to drop
    assert running_runs([3000.0] * 3, cpu[:3], threads=2) == [0, 1, 2]


def test_onnxruntime_node_times_come_from_the_kept_runs_minus_the_profiler_cost():
    from mobilehv.profile.ort_worker import fastest_node_us, node_times

    def kernel(name, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": "Conv" if name == "conv" else "Relu",
                         "output_type_shape": [{"float": [1, 8, 4, 4]}]}}

    trace = [{"cat": "Session", "name": "model_run", "ts": t} for t in (0, 100, 200)]
    trace += [kernel("conv", 1, 10), kernel("relu", 12, 3),    # run 0
              kernel("conv", 101, 50), kernel("relu", 152, 4),  # run 1: left out
              kernel("conv", 201, 12), kernel("relu", 214, 2)]  # run 2
    assert node_times(trace, [0, 2], cost_us=2.5) == [["conv", "Conv", "1x8x4x4", [8.0, 10.0]],
                                                     ["relu", "Relu", "1x8x4x4", [1.0, 0.0]]]
    assert fastest_node_us(trace, [0, 2]) == 3.0  # relu's (3.5 + 2.5) / 2 caps the profiler cost


def test_tflite_ops_the_converter_merged_keep_their_own_module():
    """Tensor names as litert-torch writes them when the converter merged ops (from DeiT-S and
    CvT-13 exports): `;`-joined locations, the op's own first."""
    from mobilehv.profile.tflite import tensor_scopes

    def name(*paths: str) -> str:
        return ";;".join("mobilehv.models.deit.DeiT/torch.nn.modules.container.Sequential_blocks/"
                         + "/".join(f"{cls}_{attr}" for cls, attr in (p.split(":") for p in path.split("/")))
                         for path in paths) + ";1"

    block = "mobilehv.models.deit.Block:0"
    proj = "mobilehv.layers.blocks.Attention:attn/torch.nn.modules.conv.Conv2d:proj"
    norm1, norm2 = "mobilehv.layers.layout.LayerNorm2d:norm1", "mobilehv.layers.layout.LayerNorm2d:norm2"
    act, fc1 = "mobilehv.models.cvt.QuickGELU:act", "torch.nn.modules.linear.Linear:fc1"
    mlp = f"{block}/mobilehv.layers.blocks.Mlp:mlp"
    cases = [("ADD", [block, f"{block}/{proj}"], "blocks.0"),  # the residual add, not the projection
             ("MEAN", [f"{block}/{norm2}", f"{block}/{norm1}"], "blocks.0.norm2"),  # not the norm before
             ("RESHAPE", [f"{block}/{norm2}", f"{block}/{norm1}"] * 2, "blocks.0.norm2"),
             ("CONV_2D", [f"{mlp}/{act}", f"{mlp}/{fc1.replace('linear.Linear', 'conv.Conv2d')}"], "blocks.0.mlp.fc1"),
             # fc1's output reshape, moved by the converter to inside the activation after it
             ("RESHAPE", [f"{mlp}/{act}", f"{mlp}/{act}", f"{mlp}/{fc1}"], "blocks.0.mlp.fc1")]
    for op_type, paths, expected in cases:
        assert tensor_scopes(name(*paths), op_type)[-1].path == expected, (op_type, paths)


def test_tflite_runner_cuts_real_single_op_models(export_dir):
    from mobilehv.export import export
    from mobilehv.profile import tflite

    name, res = next((m for m in MODELS if m[0] == "mobilevit_xxs"), MODELS[0])
    path = export(name, "tflite", export_dir, resolution=res, cache=True).path
    result = profile(runtime="tflite", artifact=path, warmup=2, repeats=5, out=None)
    _check_run(result)
    # ops the converter merged others into keep their own module: a residual Add is not its
    # projection's, and each LayerNorm owns its two Means (not the norm of the block before)
    ops = result.ops
    assert ops[(ops["op_type"] == "ADD") & ops["module_class"].str.endswith("Conv2d")].empty
    means = ops[(ops["op_type"] == "MEAN") & ops["module_class"].str.endswith("LayerNorm")]
    assert len(means) and set(means.groupby("module_path").size()) == {2}
    # a single-op model cut from the flatbuffer computes what that op computes in the whole model
    data, model = tflite._load(Path(path))
    ref = tflite._interpreter(data, 1, reference=True)
    x = np.random.default_rng(1).standard_normal(ref.get_input_details()[0]["shape"]).astype(np.float32)
    ref.set_tensor(ref.get_input_details()[0]["index"], x)
    ref.invoke()
    codes = tflite._builtin_names()
    ops = model.subgraphs[0].operators
    conv = next(i for i, op in enumerate(ops) if codes[model.operatorCodes[op.opcodeIndex].builtinCode] == "CONV_2D")
    content, feeds = tflite.cut_model(model, [conv])
    it = tflite._interpreter(content, 1)
    for detail, old in zip(it.get_input_details(), feeds):
        it.set_tensor(detail["index"], ref.get_tensor(old))
    it.invoke()
    expected = ref.get_tensor(ops[conv].outputs[0])
    got = it.get_tensor(it.get_output_details()[0]["index"])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # PADs that XNNPACK fuses into their conv are timed as the pair's extra cost, and the pair
    # cut together still computes the conv's tensor of the whole model
    pads = result.ops[result.ops["op_type"] == "PAD"]
    assert len(pads) and set(pads["measure"]) == {"marginal"}
    pad = next(i for i, op in enumerate(ops) if codes[model.operatorCodes[op.opcodeIndex].builtinCode] == "PAD")
    (reader,) = [j for j, op in enumerate(ops) if ops[pad].outputs[0] in op.inputs]
    content, feeds = tflite.cut_model(model, [pad, reader])
    it = tflite._interpreter(content, 1)
    (detail,) = it.get_input_details()
    it.set_tensor(detail["index"], ref.get_tensor(feeds[0]))
    it.invoke()
    expected = ref.get_tensor(ops[reader].outputs[0])
    got = it.get_tensor(it.get_output_details()[0]["index"])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.full
@pytest.mark.parametrize("name", smallest_per_family())
def test_every_family_profiles_on_three_runtimes(name, export_dir):
    """Every family (smallest variant, every layout) on onnxruntime, LiteRT and torch, >= 95%
    of the time attributed to a module. Ops vs e2e for the same models:
    `python benchmarks/profile_repeatability.py --families --runtime all`."""
    for rt, repeats in (("onnxruntime", 20), ("torch", 5), ("tflite", 5)):
        result = profile(name, runtime=rt, layout="both", warmup=5, repeats=repeats, out=None,
                         export_dir=export_dir)
        _check_run(result)


# --- tables, figure, CLI -----------------------------------------------------------------------

def test_cli_writes_tables_and_figure(tmp_path):
    name = next((n for n, _ in MODELS if len(_layouts(n)) == 2), MODELS[0][0])
    res = dict(MODELS)[name]
    out = tmp_path / "tables"
    r = runner.invoke(app, ["profile", name, "--runtime", "torch", "--layout", "both", "--resolution",
                            str(res), "--warmup", "2", "--repeats", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert name in r.output and "e2e median" in r.output
    (machine_dir,) = out.iterdir()
    assert machine_dir.name.endswith("-1t")
    summary = pd.read_csv(machine_dir / "summary.csv")
    assert list(summary.columns) == summary_columns()
    assert set(summary["layout"]) == set(_layouts(name))
    for layout in _layouts(name):
        stem = name if layout == "nchw" else f"{name}_{layout}"
        ops = pd.read_csv(machine_dir / "torch" / f"{stem}.csv")
        assert list(ops.columns) == list(OP_COLUMNS) and len(ops) > 10
    facts = json.loads((machine_dir / "machine.json").read_text())
    assert {"cpu", "cores", "threads", "os", "versions"} <= set(facts)
    assert facts["versions"]["onnxruntime"] and facts["versions"]["torch"]
    assert (machine_dir / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (machine_dir / "breakdown.svg").read_bytes()[:500]
    assert not list(out.rglob("*.tmp"))


def _bad(args, out: Path) -> str:
    r = runner.invoke(app, ["profile", *args, "--out", str(out)])
    assert r.exit_code != 0, r.output
    assert not out.exists(), "a failed profile left files behind"
    return r.output


def test_bad_runtime_device_and_layout(tmp_path):
    out = tmp_path / "t"
    assert "onnxruntime" in _bad(["poolformer_s12", "--runtime", "tensorrt"], out)
    assert "cpu" in _bad(["poolformer_s12", "--device", "gpu"], out)
    assert "unknown model" in _bad(["no_such_model", "--runtime", "torch"], out)
    assert "layouts" in _bad(["poolformer_s12", "--runtime", "torch", "--layout", "tokens"], out)


def test_bad_artifacts(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    out = tmp_path / "t"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not an onnx model" * 10)
    assert "not a valid ONNX model" in _bad(["--artifact", str(corrupt)], out)
    foreign = tmp_path / "foreign.onnx"
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    assert "module names" in _bad(["--artifact", str(foreign)], out)
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"garbage" * 20)
    assert "TFLite" in _bad(["--artifact", str(fake)], out)
    assert "runs on" in _bad(["--artifact", str(fake), "--runtime", "onnxruntime"], out)
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    assert "unknown kind" in _bad(["--artifact", str(other)], out)
    assert "does not exist" in _bad(["--artifact", str(tmp_path / "missing.onnx")], out)


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS the coreml runtime exists")
def test_coreml_needs_macos(tmp_path):
    output = _bad(["poolformer_s12", "--runtime", "coreml"], tmp_path / "t")
    assert "needs macOS" in output


def test_runtime_not_installed(tmp_path):
    # an interpreter in which onnxruntime cannot be imported, as on a machine without it
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.argv = ['mobilehv'] + sys.argv[1:]; "
            "from mobilehv.cli import app; app()")
    out = tmp_path / "t"
    r = subprocess.run([sys.executable, "-c", code, "profile", "poolformer_s12", "--runtime",
                        "onnxruntime", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "not installed" in r.stderr and "pip install onnxruntime" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not out.exists()


def test_failed_run_leaves_previous_tables_untouched(tmp_path):
    name, res = MODELS[0]
    out = tmp_path / "tables"
    profile(name, runtime="torch", resolution=res, warmup=1, repeats=3, out=out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the export folder should be")
    # torch profiles fine, then exporting for onnxruntime fails: nothing may be written
    with pytest.raises(ProfileError, match="cannot write"):
        profile(name, runtime=["torch", "onnxruntime"], resolution=res, warmup=1, repeats=3,
                out=out, export_dir=blocker)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_write_is_atomic_when_rendering_fails(tmp_path, monkeypatch):
    from mobilehv.profile import figures

    name, res = MODELS[0]
    result = profile(name, runtime="torch", resolution=res, warmup=1, repeats=3, out=None)

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "breakdown_figure", broken)
    from mobilehv.profile import write_tables

    with pytest.raises(RuntimeError):
        write_tables(result, tmp_path / "tables")
    assert not [p for p in (tmp_path / "tables").rglob("*") if p.is_file()]
