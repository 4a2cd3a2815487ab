"""The documentation's code runs: the quick start's snippets, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

DOCS = Path(__file__).resolve().parents[2] / "docs"


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


def test_the_tracker_page_snippet_runs():
    """The training-loop example of docs/track.md runs as it stands (its warnings recorded)."""
    import warnings

    import matplotlib.pyplot as plt
    import torch

    from lanczos_ntk.track import BifurcationWarning

    matplotlib.use("Agg", force=True)
    text = (DOCS / "track.md").read_text(encoding="utf-8")
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {"print": lambda *a, **k: None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BifurcationWarning)
        exec(compile(block, "track.md", "exec"), namespace)
    records = namespace["records"]
    assert records.steps.tolist() == list(range(0, 20, 2))
    crossed = int(torch.nonzero(records.leading >= 0)[0])  # the student does cross ...
    assert records.first_warning is not None and records.first_warning < int(records.steps[crossed])
    plt.close("all")
