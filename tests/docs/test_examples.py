"""The seed-notebook example reaches the notebook's trained NLL."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_seed_example_reaches_the_notebooks_nll(tmp_path):
    out = tmp_path / "seed.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_mle.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    match = re.search(
        r"NLL: ([\d.]+) \(init\) -> ([\d.]+) \(trained\)\s+\[EM fit: ([\d.]+)\]",
        run.stdout,
    )
    assert match, run.stdout
    init, trained, em = map(float, match.groups())
    assert trained <= 1.6490 < init  # the seed's own run: 1.7441 -> 1.6490
    assert abs(trained - em) < 2e-3
    assert out.stat().st_size > 10_000
