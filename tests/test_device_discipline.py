"""Where tensors are made: on a GPU, a tensor made on the host and met by one on the device is a crash (the cg
solver's shifted Lanczos did exactly that: a host coefficient vector times a device basis), and one moved every step
is a slowdown. No CPU test can see either, since host and device are one there; so this test reads the library's
numeric code and requires every tensor factory call to say where its tensor lives: `device=` (the model's, an
operand's), a `*_like` factory, or a `# host:` comment on (or just above) the call's first line saying why the host
is right (a k × k tridiagonal, a list of losses to report, data built before it is moved once). The device check
(bench/device_check.py, run on the CPU in test_own_finetune) then runs every method and solver end to end."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "llmeraser"
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "eye", "rand", "randn", "randint", "randperm",
             "linspace", "as_tensor"}
# the modules that compute with the model's tensors (data loading, files and the command line do not)
NUMERIC = ["solvers", "factors", "updates", "curvature.py", "damping.py", "replay.py", "eraser.py", "metrics.py",
           "evidence.py",
           "trajectory.py", "finetune.py", "task.py", "params.py", "distributed.py", "callback.py", "recorder.py",
           "storage.py", "logits.py"]


def _files() -> list[Path]:
    out = []
    for name in NUMERIC:
        path = SRC / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def undeclared(path: Path) -> list[str]:
    """The factory calls in `path` that neither pass device= nor carry a `# host:` comment on their first line."""
    lines = path.read_text().splitlines()
    bad = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES):
            continue
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if any(k.arg == "device" for k in node.keywords) or "# host:" in lines[node.lineno - 1] or \
                above.startswith("# host:"):
            continue
        bad.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return bad


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_tensor_says_where_it_lives(path):
    bad = undeclared(path)
    assert not bad, "tensor factories without device= (or a '# host:' reason):\n" + "\n".join(bad)


def test_the_check_sees_an_undeclared_factory(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nx = torch.zeros(3)\ny = torch.ones(2, device=x.device)\n"
                     "z = torch.eye(2)  # host: a 2 × 2 constant\nw = torch.tensor(\n    [1.0])\n"
                     "v = torch.zeros_like(x)\n# host: a reason above\nu = torch.ones(1)\n")
    assert [b.split(":")[1] for b in undeclared(probe)] == ["2", "5"]
