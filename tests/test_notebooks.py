"""Execute the notebooks (nbclient) and check what they print."""

import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def test_planning_notebook():
    path = os.path.join(HERE, "..", "notebooks", "00_planning.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "Plan 'autoplan'" in text and "mlp_in/kernel" in text
    ratio = float(text.split("ratio to best baseline ")[1].split()[0])
    assert ratio <= 1.0


def test_quickstart_notebook_trains_with_the_plan():
    path = os.path.join(HERE, "..", "notebooks", "01_quickstart.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    first, reference = (float(v) for v in text.split("first step loss ")[1].split("\n")[0]
                        .replace("(single-device jax.jit: ", "").rstrip(")").split())
    assert abs(first - reference) <= 1e-5 * abs(reference)  # the planned program computes the same loss
    start, end = (float(v) for v in text.split("\nloss ")[1].split("\n")[0].split(" -> "))
    assert end < start - 0.5  # training works: the loss falls
    assert "plans made: 1" in text and "Plan 'autoplan': mesh data=2 x model=4" in text
    assert "per-device argument bytes:" in text
