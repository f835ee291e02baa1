"""Execute one py:percent tutorial and write it as a Markdown page with figures.

Usage: ``python docs/_scripts/render_tutorial.py TUTORIAL.py [...] OUT_DIR``

Writes ``OUT_DIR/<stem>.md`` and ``OUT_DIR/<stem>_files/figure_<n>.png``.
Given a Markdown page (``PAGE.md``) instead, it executes the page's
```` ```python ```` blocks in order in one namespace and writes nothing: the
quickstart and how-to snippets are checked this way.

Why a 100-line runner instead of mkdocs-jupyter/nbconvert: the tutorials are
plain scripts (``python docs/tutorials/02_the_tails.py`` runs them), so
executing them needs no Jupyter kernel, and emitting Markdown lets the site
render their math with the same arithmatex/MathJax setup as the API pages and
their code with the theme's own highlighting. jupytext parses the cells, so the
same files still open as notebooks (``jupytext --to notebook FILE``).

Cells run in order in one namespace, as in a notebook: a code cell is shown as
a Python block, followed by what it printed and by every matplotlib figure it
left open (saved as PNG, then closed). Any exception fails the run with the
cell's traceback. What a maintainer may change: the page layout; keep the
non-zero exit on error (CI relies on it).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

import jupytext
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Figures are shown at about half their size in the page's content column:
# larger text keeps tick labels and legends readable there.
plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10})

_REPO = Path(__file__).resolve().parents[2]


def _source_link(path: Path) -> str:
    relative = path.resolve().relative_to(_REPO)
    return (
        f'!!! info "Run it yourself"\n'
        f"    This page is the executed script `{relative}`, rendered with its "
        f"output. Run it with `python {relative}`, or open it as a notebook "
        f"with `jupytext --to notebook {relative}`. "
        f"Set `MIXCDF_TUTORIAL_SMALL=1` for the quick version CI runs.\n"
    )


def render(path: Path, out_dir: Path) -> Path:
    """Runs ``path`` cell by cell and writes ``out_dir/<stem>.md``."""
    notebook = jupytext.read(path, fmt="py:percent")
    stem = path.stem
    figure_dir = out_dir / f"{stem}_files"
    figure_dir.mkdir(parents=True, exist_ok=True)
    namespace: dict = {"__name__": "__main__", "__file__": str(path)}
    parts: list[str] = []
    n_figures = 0
    started = time.perf_counter()
    for index, cell in enumerate(notebook.cells):
        source = cell.source.strip("\n")
        if not source:
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
            if index == 0:
                parts.append(_source_link(path))
            continue
        if cell.cell_type != "code":
            continue
        parts.append(f"```python\n{source}\n```")
        buffer = io.StringIO()
        code = compile(source, f"{path}:cell{index}", "exec")
        cell_start = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            exec(code, namespace)
        if os.environ.get("MIXCDF_TUTORIAL_PROFILE"):
            seconds = time.perf_counter() - cell_start
            print(f"  cell {index}: {seconds:.1f} s", file=sys.stderr)
        printed = buffer.getvalue().rstrip()
        if printed:
            parts.append(f'```text title="output"\n{printed}\n```')
        for number in plt.get_fignums():
            n_figures += 1
            name = f"figure_{n_figures}.png"
            plt.figure(number).savefig(figure_dir / name, dpi=100, bbox_inches="tight")
            parts.append(f"![{stem} figure {n_figures}]({stem}_files/{name})")
        plt.close("all")
    page = out_dir / f"{stem}.md"
    page.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - started
    print(f"{path.name}: {elapsed:.1f} s, {n_figures} figure(s)", file=sys.stderr)
    return page


def run_snippets(path: Path) -> None:
    """Executes the ``python`` code blocks of a Markdown page, in order."""
    started = time.perf_counter()
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)
    namespace: dict = {"__name__": "__main__"}
    with contextlib.redirect_stdout(io.StringIO()):
        for index, block in enumerate(blocks):
            exec(compile(block, f"{path}:block{index}", "exec"), namespace)
    elapsed = time.perf_counter() - started
    print(
        f"{path.name}: {elapsed:.1f} s, {len(blocks)} snippet(s) ran", file=sys.stderr
    )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Several sources run one after the other in this process (sharing its
    # imports and JAX's in-memory compilation cache), each in a fresh namespace.
    for source in map(Path, sys.argv[1:-1]):
        if source.suffix == ".md":
            run_snippets(source)
        else:
            render(source, Path(sys.argv[-1]))
