"""latency_tables/<machine>/...: per-op CSVs, summary.csv, machine.json, written atomically.

Every file is written under a temporary name in its final folder and renamed into place only
after all files of the run were rendered, so a failure leaves the previous tables untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mobilehv.profile.records import KEY, summary_columns


def op_table_path(out: Path, machine: str, runtime: str, model: str, layout: str) -> Path:
    """`<model>.csv` for the nchw layout (the default), `<model>_<layout>.csv` otherwise."""
    stem = model if layout == "nchw" else f"{model}_{layout}"
    return Path(out) / machine / runtime / f"{stem}.csv"


def merged_summary(path: Path, new):
    """Existing summary rows with the new ones replacing those of the same (model, runtime, layout)."""
    import pandas as pd

    new = new.reindex(columns=summary_columns())
    if not path.is_file():
        return new
    old = pd.read_csv(path)
    keys = set(map(tuple, new[list(KEY)].astype(str).values))
    keep = old[[tuple(r) not in keys for r in old[list(KEY)].astype(str).values]]
    merged = pd.concat([keep.reindex(columns=summary_columns()), new], ignore_index=True)
    return merged.sort_values(list(KEY), kind="stable").reset_index(drop=True)


class AtomicWriter:
    """Collects files to write, then writes each to a temp name and renames them all at once."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []

    def _temp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.pending.append((Path(tmp), path))
        return Path(tmp)

    def csv(self, frame, path: Path) -> None:
        frame.to_csv(self._temp(path), index=False)

    def json(self, data: dict, path: Path) -> None:
        self._temp(path).write_text(json.dumps(data, indent=1) + "\n")

    def figure(self, fig, path: Path) -> None:
        fig.savefig(self._temp(path), format=path.suffix.lstrip("."), dpi=150, bbox_inches="tight")

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self.pending:
            os.replace(tmp, final)
            done.append(final)
        self.pending.clear()
        return done
