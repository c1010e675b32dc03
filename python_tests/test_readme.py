"""The README's example runs as written (forward and backward)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_module_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "class LinearMemoryLayer" in b)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    layer = namespace["LinearMemoryLayer"](dim=32, heads=2, head_dim=8)
    x = torch.randn(2, 100, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_readme_model_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "TitansLM(" in b)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 1000, 256) and namespace["y_next"].shape == (2, 10, 256)
    assert namespace["logits"].shape == (2, 512, 1000)
    assert namespace["tokens"].shape[-1] == 16 + 32
