"""The notebook rebuilds the figures from the committed latency_tables/ alone."""
from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_latency_breakdown_notebook_runs():
    path = ROOT / "notebooks" / "latency_breakdown.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure rebuilt"
    assert any("e2e ratio" in o.get("data", {}).get("text/plain", "") for o in outputs)
