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
