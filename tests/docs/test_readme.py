"""The README's usage snippet runs as written and does what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_usage_snippet_runs_and_round_trips():
    text = README.read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    x, x_back = np.asarray(namespace["x"]), np.asarray(namespace["x_back"])
    np.testing.assert_allclose(x_back, x, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(namespace["samples"])))
    # Training from the quantile warm start lowers the full-data NLL.
    dm, data = namespace["dm"], namespace["x"]

    def nll(model):
        return -float(np.mean(dm.normalizing_flow(model, (2,)).log_prob(data)))

    assert nll(namespace["result"].model) < nll(namespace["layer"]) - 0.01
    grads = namespace["grads"]
    assert all(np.all(np.isfinite(np.asarray(g))) for g in (grads.means, grads.logits))
