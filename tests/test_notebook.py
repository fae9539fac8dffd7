"""examples/quickstart.ipynb executed top to bottom by nbclient on a real ipykernel (issue 22, item 6):
every cell runs, the run's table is HTML, the figures are PNG images, the run folder is a real one."""

from __future__ import annotations

import base64
import io
import os

import pytest
from conftest import REPO
from PIL import Image

nbformat = pytest.importorskip("nbformat", reason="needs the notebook extra: pip install '.[notebook]'")
nbclient = pytest.importorskip("nbclient", reason="needs the notebook extra: pip install '.[notebook]'")
pytest.importorskip("ipykernel", reason="needs the notebook extra: pip install '.[notebook]'")

NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def _outputs(cell, kind: str) -> list:
    return [output["data"][kind] for output in cell.get("outputs", []) if kind in output.get("data", {})]


@pytest.mark.slow
def test_the_quickstart_runs_and_shows_its_table_and_plots(tmp_path, data_dir, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("LENETLAB_DATA", str(data_dir))
    src = str(REPO / "src")  # the kernel imports this checkout's lenetlab, as the tests do
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    # python3: jupyter_client's own kernel, this interpreter's ipykernel
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file() and (runs[0] / "report.html").is_file()
    shown = {cell.source.strip(): cell for cell in code}
    run_html = _outputs(shown["run"], "text/html")
    assert run_html and "<table" in run_html[0] and "data:image/png;base64," in run_html[0]
    assert "<table" in _outputs(shown["run.table()"], "text/html")[0]
    assert "batch_norm" in _outputs(shown["run.comparisons()"], "text/html")[0]
    pngs = _outputs(shown['run.plot("convergence", "batch_norm")'], "image/png")
    assert len(pngs) == 1  # once, not twice
    image = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    shades = sum(1 for count in image.convert("L").histogram() if count)
    assert image.format == "PNG" and image.width >= 400 and shades > 10  # a plot, not a blank
    printed = "".join(o.get("text", "") for o in code[-1].outputs)
    assert "true class: Ankle boot; predicted: [(" in printed
