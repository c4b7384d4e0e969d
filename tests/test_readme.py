"""The README's API example runs and its shape comments are true."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_and_shapes_hold():
    text = README.read_text()
    block = re.search(r"## Ten lines of API\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    result = namespace["result"]
    assert tuple(result.slots.shape) == (4, 32, 4, 5)
    assert tuple(result.elbo.shape) == (4, 32)
    assert tuple(result.history.shape) == (51, 4, 32)
    best = namespace["best"]
    assert tuple(best.slots.shape) == (1, 32, 4, 5)
    # the best restart, or one tied with it up to float32 rounding (16 ε, relative)
    assert torch.allclose(best.elbo[0], result.elbo.max(0).values, rtol=2e-6, atol=0)
    # EM never lowers the ELBO; the learned step returned a finite task loss.
    assert (result.history.diff(dim=0) >= -1e-3 * result.history[:-1].abs()).all()
    assert torch.isfinite(torch.tensor(namespace["loss"]))
    assert tuple(namespace["inner_result"].slots.shape) == (1, 32, 4, 5)


def test_readme_quickstart_commands_exist_in_makefile():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    text = README.read_text()
    quick = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
