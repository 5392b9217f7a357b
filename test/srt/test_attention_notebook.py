"""examples/attention_tokens.ipynb runs top to bottom (nbclient, the venv's python3 kernel).

The notebook starts its own server on the default model (a free port, a small KV pool), asks
through the openai client and shows each report; so it cannot rot: any cell that raises fails this
test. Its working files (server log, saved HTML) go to a temporary folder; the executed notebook is
written to $SGLANG_TEST_ARTIFACTS (default test/srt/artifacts/) and its path printed. To refresh
the committed outputs, copy that file over examples/attention_tokens.ipynb.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "attention_tokens.ipynb"
ARTIFACTS = Path(os.environ.get("SGLANG_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def test_notebook_runs(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        out = ARTIFACTS / NOTEBOOK.name
        nbformat.write(nb, out)
        print(f"executed notebook: {out}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(_text(c) for c in code)
    assert "server ready at" in text and "server stopped" in text
    assert "200 text/html" in text  # the viewer page
    views = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(views) >= 7  # every heat map cell displayed its view
    assert (tmp_path / "attention_tokens.html").exists()
