"""The documentation's code runs: the quick start's snippets, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_quickstart_snippets_run(tmp_path, monkeypatch):
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"print": lambda *a, **k: None}
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)
    assert namespace["top"].eigenvalues.shape == (5,)
    assert {b.kind for b in namespace["branch"].bifurcations}
    plt.close("all")


def test_import_is_free_of_deprecation_warnings():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", "import lanczos_ntk"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-500:]
