"""Runs the float64 suite (`tests/float64/`) in a separate process.

`jax_enable_x64` is process-wide; toggling it inside this process leaked into
the float32 tests and, measured here, aborted XLA compiles. The child process
starts with JAX_ENABLE_X64=1, runs its tests in one process, and its full
report is printed on failure.
"""

import os
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_float64_suite_passes_in_its_own_process():
    env = dict(os.environ, JAX_ENABLE_X64="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            # One process: its tests then share every compiled float64 map
            # (compilation is most of their time), and the parent's other
            # worker keeps the second core busy meanwhile. Two workers here
            # made three processes on two cores and compiled everything twice.
            "-n",
            "0",
            str(HERE / "float64"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE.parent,
        timeout=1200,
    )
    print(run.stdout[-5000:], run.stderr[-2000:])
    assert run.returncode == 0, run.stdout[-5000:]
    summary = re.search(r"(\d+) passed", run.stdout)
    assert summary, run.stdout[-2000:]
    assert int(summary.group(1)) >= 15, run.stdout[-2000:]
