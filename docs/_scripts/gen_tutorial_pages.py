"""mkdocs-gen-files script: execute every tutorial and add its page to the build.

It also executes the code blocks of the quickstart and the how-to pages (in
their own processes, writing nothing), so every snippet on the site runs.

Each ``docs/tutorials/NN_*.py`` runs in its own Python process (so one
tutorial's JAX flags or matplotlib state cannot leak into another's, exactly as
when a reader runs it) through ``render_tutorial.py``; the resulting Markdown
and PNG figures are written into the build as virtual files, so nothing
generated lands in the source tree. A tutorial that raises fails the build.

Environment: ``MIXCDF_TUTORIAL_SMALL=1`` (what CI sets) makes every tutorial use
fewer steps and points; ``MIXCDF_TUTORIAL_JOBS`` (default 2) sets how many run
at once; ``MIXCDF_TUTORIAL_CACHE=DIR`` (for ``mkdocs serve`` while editing
prose) reuses a script's last output while the script's text is unchanged;
never set it in CI: a change in the library would not re-run the tutorials.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mkdocs_gen_files

_DOCS = Path(__file__).resolve().parents[1]
_RUNNER = Path(__file__).with_name("render_tutorial.py")


def _run(job: list[Path], out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    # Pages land beside their source: tutorials/NN_x.py -> tutorials/NN_x.md.
    script = job[0]
    section_dir = out_dir / script.parent.name
    command = [sys.executable, str(_RUNNER), *map(str, job), str(section_dir)]
    cache = os.environ.get("MIXCDF_TUTORIAL_CACHE")
    if not cache:
        return subprocess.run(command, capture_output=True, text=True, env=env)
    key = hashlib.sha256(
        b"".join(path.read_bytes() for path in job)
        + _RUNNER.read_bytes()
        + os.environ.get("MIXCDF_TUTORIAL_SMALL", "").encode()
    ).hexdigest()[:16]
    entry = Path(cache) / f"{script.stem}-{key}"
    source, target = (section_dir, entry) if not entry.exists() else (entry, None)
    if target is not None:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            return result
    else:
        target = section_dir
        result = subprocess.CompletedProcess(command, 0, "", f"{script.name}: cached")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob(f"{script.stem}*"):
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        copy(path, target / path.name)
    return result


def main() -> None:
    """Renders all tutorials and registers their pages and figures."""
    # Longest first (the later tutorials run longest), so the pool stays busy
    # to the end. The Markdown snippets share one process: their imports and
    # compiled functions overlap.
    tutorials = sorted((_DOCS / "tutorials").glob("[0-9][0-9]_*.py"), reverse=True)
    snippets = [_DOCS / "quickstart.md", *sorted((_DOCS / "how-to").glob("*.md"))]
    how_to = [[path] for path in sorted((_DOCS / "how-to").glob("*.py"))]
    jobs = [[path] for path in tutorials]
    jobs[2:2] = [snippets, *how_to]
    workers = int(os.environ.get("MIXCDF_TUTORIAL_JOBS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: _run(job, out_dir), jobs))
        failed = []
        for job, result in zip(jobs, results, strict=True):
            sys.stderr.write(result.stderr if result.returncode else "")
            if result.returncode:
                failed.append(", ".join(path.name for path in job))
            else:
                print(result.stderr.strip() or job[0].name)
        if failed:
            raise RuntimeError(f"docs script(s) failed: {', '.join(failed)}")
        for path in sorted(out_dir.rglob("*")):
            if path.is_dir():
                continue
            target = path.relative_to(out_dir)
            with mkdocs_gen_files.open(target, "wb") as handle:
                handle.write(path.read_bytes())
            if path.suffix == ".md":
                mkdocs_gen_files.set_edit_path(target, target.with_suffix(".py"))


def density_benchmark_page() -> None:
    """``benchmarks/density.md``: the density benchmark's own results file.

    ``benchmarks/density/run.py`` writes ``results.md`` and PNG figures next to
    itself; the page shows them as written (figures copied alongside), or says
    how to produce them when the file is absent.
    """
    results = _DOCS.parent / "benchmarks" / "density" / "results.md"
    command = "python benchmarks/density/run.py"
    if results.exists():
        text = results.read_text(encoding="utf-8")
        for figure in sorted(results.parent.glob("*.png")):
            with mkdocs_gen_files.open(f"benchmarks/{figure.name}", "wb") as handle:
                handle.write(figure.read_bytes())
        note = (
            f"\n\nReproduce with `{command}` (`--quick` for a short run); "
            "this page shows `benchmarks/density/results.md` as that run wrote it.\n"
        )
    else:
        text = "# Density-estimation benchmark\n"
        note = f"\nNo results yet: run `{command}` to write them.\n"
    with mkdocs_gen_files.open("benchmarks/density.md", "w") as handle:
        handle.write(text + note)


def conditional_benchmark_figures() -> None:
    """Copies ``benchmarks/conditional/*.png`` (full runs) beside its page.

    ``docs/benchmarks/conditional.md`` includes the run's ``results.md`` and
    shows its figures as ``conditional_<name>.png``.
    """
    source = _DOCS.parent / "benchmarks" / "conditional"
    for figure in sorted(source.glob("*.png")):
        if figure.stem.endswith("_quick"):
            continue
        target = f"benchmarks/conditional_{figure.name}"
        with mkdocs_gen_files.open(target, "wb") as out:
            out.write(figure.read_bytes())


main()
density_benchmark_page()
conditional_benchmark_figures()
