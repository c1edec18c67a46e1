# ---- tutorial notebook ----
import time
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent / "tutorial.ipynb"


def test_tutorial_notebook_runs_top_to_bottom():
    """Execute tutorial.ipynb in a fresh kernel from the repo root, in memory (the file is not
    rewritten). Any error, including a failed assertion against ravlt.py, fails the test."""
    # imported here so that a missing notebook dependency fails this test, not the whole file
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # committed with its outputs, from one clean top-to-bottom run
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert sum("$" in c.source for c in nb.cells if c.cell_type == "markdown") >= 10

    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIAL.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError at the first failing cell
    assert time.perf_counter() - start < 300, "the tutorial must run in under 5 minutes"
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 3
