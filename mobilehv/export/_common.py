"""Helpers every target shares: the parity input and check, hashing, versions, atomic writes."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mobilehv.export.formats import Tolerance


def parity_image(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """A fixed uint8 RGB batch `(B, 3, H, W)`: smooth random colour fields.

    Smooth rather than white noise so activations look like a photo's, not an adversary's.
    """
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(batch, 3, 7, 7, generator=g)
    img = F.interpolate(field, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def normalise(image: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` -> the float input the model was trained on."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (image.float() / 255 - m) / s


def compare(out: np.ndarray, ref: np.ndarray, tol: Tolerance, runtime: str) -> dict[str, Any]:
    """Parity record of one artifact's output against the deploy form's."""
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape)
    ref = np.asarray(ref, dtype=np.float64)
    max_abs = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    top5 = bool(all(set(np.argsort(-o)[:5]) == set(np.argsort(-r)[:5])
                    for o, r in zip(out.reshape(len(ref), -1), ref.reshape(len(ref), -1))))
    ok = max_rel <= tol.rel and (top5 or not tol.same_top5)
    return {"ran": True, "runtime": runtime, "max_abs": max_abs, "max_rel": max_rel,
            "tolerance_rel": tol.rel, "same_top5": top5, "top5_required": tol.same_top5,
            "passed": bool(ok)}


def versions(*distributions: str) -> dict[str, str]:
    out = {}
    for dist in distributions:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder (an .mlpackage) as relative paths + contents, sorted."""
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    for rel, p in files:
        if path.is_dir():
            h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Identity of the weights (key names, shapes, values), whatever file they came from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def code_sha256(model: torch.nn.Module) -> str:
    """Identity of the code the deploy form runs: the source files of its module classes, so an
    edited forward() or fold() invalidates cached artifacts even when the weights are unchanged."""
    import inspect

    files = sorted({inspect.getsourcefile(type(m)) or "" for m in model.modules()
                    if type(m).__module__.startswith("mobilehv.")})
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def writable_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot be created/written, checked without creating anything."""
    p = out_dir.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


@contextlib.contextmanager
def staging(final_dir: Path) -> Iterator[Path]:
    """A temporary folder inside `final_dir` (created with its parents); removed on exit.

    Everything is built here and moved into place with `os.replace`, so a failed export
    leaves nothing behind: folders this call created are removed again if they end up empty.
    """
    created = []
    p = final_dir.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mobilehv-tmp-", dir=final_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: the export failed before anything moved in


def move_into_place(src: Path, dst: Path) -> None:
    """Atomic rename of a file or folder over `dst` (a folder is swapped, then the old removed)."""
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json(obj: Any, dst: Path, tmp_dir: Path) -> None:
    tmp = tmp_dir / (dst.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, dst)


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Send what converters print on stderr (C++ logs, progress bars, warnings) to a scratch file.

    For the CLI, whose progress bar and one-line errors would drown in converter chatter.
    """
    import sys
    import warnings

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
