"""The README's Python example runs as written: a documented call that no longer exists fails here."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tests.models import TinyConvNet

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:
    blocks = _python_blocks()
    assert blocks, "the README lost its Python example"
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(4)]
    heldout = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)]
    model = TinyConvNet().eval()
    head = next(n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    def top1(m: nn.Module, data: list[torch.Tensor]) -> float:
        with torch.no_grad():
            ref = [model(x).argmax(1) for x in data]
            return float(sum((m(x).argmax(1) == r).float().mean() for x, r in zip(data, ref, strict=True)))

    scope = {"model": model, "batches": batches, "heldout": heldout, "top1": top1}
    for block in blocks:
        exec(compile(block.replace('"head.*"', repr(head)), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.table.loc[head, "decision"] == "fp" and result.policy.method_for(head) == "fp"
    assert (tmp_path / "reports" / "mine" / "report.html").is_file()
    assert isinstance(scope["qmodel"], nn.Module) and scope["qmodel"] is not model
