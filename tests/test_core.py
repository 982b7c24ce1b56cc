"""The core API and CLI: registry, checkpoint reading and mismatch messages, fold, list/info."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import mobilehv
from mobilehv.cli import app
from conftest import refweights, rel_err

NAME = "mobilenetv2_100"  # small, fixture-backed, one layout
runner = CliRunner()


def test_list_models_pattern():
    names = mobilehv.list_models("mobilevit*")
    assert names == ["mobilevit_s", "mobilevit_xs", "mobilevit_xxs"]
    assert NAME in mobilehv.list_models()


def test_unknown_model_names_closest():
    with pytest.raises(mobilehv.UnknownModelError, match="closest: mobilevit_xs"):
        mobilehv.create_model("mobilevit_x")


def test_bad_layout_refused():
    with pytest.raises(ValueError, match="layouts nchw"):
        mobilehv.create_model(NAME, layout="tokens")


def test_model_info_fields():
    info = mobilehv.model_info("mobilevit_s")
    assert info["family"] == "mobilevit" and info["variant"] == "s" and info["resolution"] == 256
    assert info["params"] == 5_578_632
    assert info["mean"] == [0.0, 0.0, 0.0] and info["std"] == [1.0, 1.0, 1.0]  # unnormalised RGB
    assert mobilehv.model_info("deit_tiny")["std"] == [0.229, 0.224, 0.225]
    assert 1.5e9 < info["macs"] < 2.2e9  # the paper reports ~2.0 GMACs at 256 px
    assert info["paper"]


def test_unsupported_resolution_states_rule():
    model = mobilehv.create_model(NAME)
    with pytest.raises(mobilehv.ResolutionError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 100))


@pytest.mark.parametrize("suffix,wrapper", [(".safetensors", None), (".pth", None), (".pth", "model"),
                                            (".pt", "state_dict")])
def test_load_checkpoint_files(tmp_path, suffix, wrapper):
    sd = refweights.make_state_dict("mobilenetv2_100")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":  # a flat tensor map: wrappers exist only in pickles
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrapper: sd, "epoch": 3} if wrapper else sd, path)
    x, expected = refweights.load_io("mobilenetv2_100")
    model = mobilehv.create_model(NAME, pretrained=path)
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4


def test_mismatch_names_first_missing_unexpected_and_wrong_shape():
    sd = refweights.make_state_dict("mobilenetv2_100")
    sd.pop("conv_head.weight")
    sd["bogus.weight"] = torch.zeros(1)
    sd["classifier.weight"] = torch.zeros(10, 1280)
    with pytest.raises(mobilehv.CheckpointError) as e:
        mobilehv.create_model(NAME, pretrained=sd)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing key 'conv_head.conv.weight'" in msg and "unexpected key 'bogus.weight'" in msg
    assert "wrong shape 'classifier.weight'" in msg


def test_checkpoint_of_another_architecture():
    with pytest.raises(mobilehv.CheckpointError, match="does not fit mobilenetv2_100"):
        mobilehv.create_model(NAME, pretrained=refweights.make_state_dict("poolformer_s12"))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(mobilehv.CheckpointError, match="cannot read checkpoint"):
        mobilehv.create_model(NAME, pretrained=bad)
    with pytest.raises(mobilehv.CheckpointError, match="does not exist"):
        mobilehv.create_model(NAME, pretrained=tmp_path / "missing.safetensors")


def test_fold_inplace():
    model = mobilehv.create_model(NAME)
    folded = mobilehv.fold(model, inplace=True)
    assert folded is model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_cli_list_json():
    result = runner.invoke(app, ["list", "mobilevit*", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["mobilevit_s", "mobilevit_xs", "mobilevit_xxs"]
    assert rows[0]["params"] == 5_578_632


def test_cli_list_table():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "mobile_former_508m" in result.stdout and "GMACs" in result.stdout


def test_cli_unknown_name_one_line():
    result = runner.invoke(app, ["info", "mobilevit_x"])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mobilevit_xs" in lines[0]


def test_cli_info_counts_data_movement():
    result = runner.invoke(app, ["info", "mobilevit_xxs", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["params"] == 1_272_024
    ops, moved = facts["data_movement_ops"], facts["data_movement_elements"]
    assert set(ops) == set(moved) == {"nchw", "tokens"}
    # the deploy form has more views than `tokens` (test_mobilevit.py), on small matrices
    assert ops["nchw"] > ops["tokens"] and moved["nchw"] < 0.7 * moved["tokens"]


def test_cli_info_table():
    result = runner.invoke(app, ["info", "mobilenetv2_100"])
    assert result.exit_code == 0, result.output
    assert "data-movement ops (nchw)" in result.stdout and "3,504,872" in result.stdout
