"""The serving runtime makes no device tensor from host data with a blocking copy.

`torch.tensor(values, device=cuda)` and `host_tensor.to(cuda)` copy from pageable memory
synchronously: the host waits for every kernel queued on the stream, so a step in flight
must end before the next can be prepared (with the engine's async overlap, or between the
steps of a draft loop, that bubble is the whole step). No CPU test can see it happen: on
the CPU the "device" is the host. So this test reads the runtime's source instead
(Python's ast): every such copy goes through runtime/uploads.py (pinned, non-blocking) or
is marked `# host sync ok: <why>` where waiting is the point (a value read back at once).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "runtime").glob("*.py")) + sorted((ROOT / "serving").glob("*.py"))
MAKERS = {"tensor", "as_tensor", "frombuffer", "from_numpy"}       # torch.X(...) on the host
OK = "# host sync ok:"


def _is_maker(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in MAKERS and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch")


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def blocking_uploads(source: str) -> list[tuple[int, str]]:
    """(line, text) of each host-to-device copy that would block: torch.tensor(...,
    device=d) with d not the CPU, and .to(d) / .cuda() of a tensor made on the host (a
    torch.tensor(...) call, or a name a function assigned one to) without non_blocking."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []

    def flag(node):
        text = lines[node.lineno - 1]
        end = getattr(node, "end_lineno", node.lineno)
        if not any(OK in lines[i - 1] for i in range(node.lineno, end + 1)):
            found.append((node.lineno, text.strip()))

    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))] + [tree]:
        host_names = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _is_maker(node.value):
                host_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            if _is_maker(node):
                dev = _kw(node, "device")
                if dev is not None and not (isinstance(dev, ast.Constant) and dev.value == "cpu"):
                    flag(node)
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ("to", "cuda"):
                recv = node.func.value
                host = _is_maker(recv) or (isinstance(recv, ast.Name) and recv.id in host_names)
                nb = _kw(node, "non_blocking")
                first = node.args[0] if node.args else _kw(node, "device")
                dtype_only = (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                              and first.value.id == "torch" and first.attr != "device")
                if host and not (isinstance(nb, ast.Constant) and nb.value is True) \
                        and (first is not None or node.func.attr == "cuda") and not dtype_only:
                    flag(node)
    return sorted(set(found))


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_blocking_host_to_device_copy(path):
    bad = blocking_uploads(path.read_text())
    assert not bad, (f"{path.relative_to(ROOT)}: a blocking host-to-device copy (use "
                     f"runtime/uploads.py, or mark it '{OK} <why>'): "
                     + "; ".join(f"line {n}: {t}" for n, t in bad))


@pytest.mark.parametrize("code,caught", [
    ("x = torch.tensor([1, 2], device=dev)", True),
    ("x = torch.tensor([1, 2], device='cpu')", False),
    ("x = torch.tensor([1, 2]).to(dev)", True),
    ("x = torch.tensor([1, 2]).to(dev, non_blocking=True)", False),
    ("def f(dev):\n    t = torch.tensor([1])\n    return t.to(dev)", True),
    ("def f(dev):\n    t = torch.tensor([1])\n    return t.to(torch.int32)", False),
    ("def f(dev):\n    t = torch.zeros(3, device=dev)\n    return t.to(dev)", False),
    ("x = torch.tensor([1], device=dev)  # host sync ok: read back at once", False),
    ("x = torch.frombuffer(b, dtype=torch.uint8).to(dev)", True),
])
def test_the_check_sees_what_it_should(code, caught):
    assert bool(blocking_uploads(code)) == caught
