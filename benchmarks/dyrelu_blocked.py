"""Mobile-Former's dynamic ReLU written for onnxruntime's blocked x86 layout, against the deploy form's.

    python benchmarks/dyrelu_blocked.py [--name mobile_former_294m] [--rounds 40]

Why this exists: on x86, onnxruntime runs every conv whose channels are a multiple of its block
(8 or 16) in the blocked NCHWc layout, but its blocked kernels take neither a `(1, C, 1, 1)`
broadcast Mul nor a Max. The deploy form's `max(a1 * x, a2 * x)` therefore costs a full-size
ReorderOutput before it and a ReorderInput after it, in both layouts: about 1.4 ms of
Mobile-Former-294M's reshape time, with the depthwise splits' concats more than half of
`tokens`'. This benchmark measures the one form found that stays blocked, to show what it would
gain on onnxruntime and cost on LiteRT:

    x * A1 + relu(x * D),  A1 = a1,  D = a2 - a1  (equal to max(a1 * x, a2 * x))

with A1 and D broadcast to `(1, C, H, W)` by a nearest Upsample (blocked), and `a2 - a1`
computed as `a2 + clamp(-u1, -2, 0)` (a negated copy of fc2's first half) because a Sub would
leave the blocked layout. The dynamic ReLUs of `Bottleneck` change, and in `DownBottleneck` the
one after the depthwise split; the other follows a conv with a channel multiplier, which
onnxruntime does not block anyway.

Printed per runtime: the e2e median of each form and of the `tokens` reference form, timed in
alternating blocks (as in layout_speed.py), and the ratio blocked / deploy; for onnxruntime
also the reshape and activation ms of one profile of each. Artifacts go to `--export-dir`;
nothing is written to latency_tables/.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mobilehv
from layout_speed import _runner, alternating_e2e_ms
from mobilehv.export import export
from mobilehv.layers import DepthwiseSplit
from mobilehv.models.mobile_former import Bottleneck, DownBottleneck, DynamicReLUDeploy

RUNTIMES = {"onnxruntime": "onnx", "tflite": "tflite"}


class DynamicReLUBlocked(nn.Module):
    """DynamicReLUDeploy (nchw) as ops that onnxruntime's NCHWc transformer keeps blocked:
    convs (clamps fused), same-shape Add/Mul, Relu and a nearest Upsample by integer scales."""

    def __init__(self, src: DynamicReLUDeploy):
        super().__init__()
        self.fc1, self.act, self.fc2_a, self.fc2_b = src.fc1, src.act, src.fc2_a, src.fc2_b
        self.fc2_a_neg = copy.deepcopy(src.fc2_a)
        with torch.no_grad():
            self.fc2_a_neg.weight.neg_()
            self.fc2_a_neg.bias.neg_()

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(token))
        a1 = F.hardtanh(self.fc2_a(h), 0.0, 2.0)
        d = F.hardtanh(self.fc2_b(h), -1.0, 1.0) + F.hardtanh(self.fc2_a_neg(h), -2.0, 0.0)  # a2 - a1
        scale = (float(x.shape[-2]), float(x.shape[-1]))  # (B, C, 1, 1) -> (B, C, H, W)
        a1, d = (F.interpolate(t, scale_factor=scale, mode="nearest") for t in (a1, d))
        return x * a1 + torch.relu(x * d)  # max(a1 x, a2 x) = a1 x + max(0, (a2 - a1) x)


def blocked(deploy: nn.Module) -> nn.Module:
    out = copy.deepcopy(deploy)
    for block in out.modules():
        if isinstance(block, Bottleneck):
            block.act_pw, block.act_dw = DynamicReLUBlocked(block.act_pw), DynamicReLUBlocked(block.act_dw)
        elif isinstance(block, DownBottleneck) and isinstance(block.conv_dw2, DepthwiseSplit):
            block.act_dw2 = DynamicReLUBlocked(block.act_dw2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mobile_former_294m")
    parser.add_argument("--runtime", action="append", choices=list(RUNTIMES), default=None)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--export-dir", default="export/dyrelu_blocked")
    args = parser.parse_args()
    torch.manual_seed(0)
    deploy = mobilehv.fold(mobilehv.create_model(args.name, layout="nchw")).eval()
    torch.manual_seed(0)
    tokens = mobilehv.fold(mobilehv.create_model(args.name, layout="tokens")).eval()
    forms = {"deploy": deploy, "blocked": blocked(deploy), "tokens": tokens}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, out = forms["deploy"](x), forms["blocked"](x)
    print(f"blocked vs deploy form, max abs difference of the logits: {(out - ref).abs().max():.2e}")
    for runtime in args.runtime or list(RUNTIMES):
        # export() verifies each artifact against its module before writing it
        paths = {form: export(model, RUNTIMES[runtime], f"{args.export_dir}/{form}").path
                 for form, model in forms.items()}
        t = alternating_e2e_ms({f: _runner(p, runtime) for f, p in paths.items()}, args.rounds, args.block)
        med = {k: float(np.median(np.concatenate(v))) for k, v in t.items()}
        per_round = [np.median(a) / np.median(b) for a, b in zip(t["blocked"], t["deploy"])]
        line = (f"{args.name} {runtime:12s} e2e deploy {med['deploy']:6.2f} ms  blocked {med['blocked']:6.2f} ms"
                f"  tokens {med['tokens']:6.2f} ms  blocked / deploy {med['blocked'] / med['deploy']:.3f} (rounds p10-p90 "
                f"{np.percentile(per_round, 10):.3f}-{np.percentile(per_round, 90):.3f})")
        if runtime == "onnxruntime":
            for form, path in paths.items():
                s = mobilehv.profile(artifact=path, runtime=runtime, out=None).summary.iloc[0]
                line += f"   {form}: reshape {s['reshape_ms']:.2f} ms, activation {s['activation_ms']:.2f} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
