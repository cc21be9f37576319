"""The package as a user's Python sees it from the repository root.

The repository's top-level ``kernels/`` folder (the Triton kernels, installed as
``emalora_fast.kernels``) must never be importable as a top-level ``kernels``: that name belongs
to Hugging Face's ``kernels`` package, which transformers imports. Each way of running code with
the root on ``sys.path`` is checked in a fresh interpreter started in the root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads transformers' hub-kernels integration (the code path that does `from kernels import ...`)
# and reports where `kernels` and `emalora_fast.kernels` were found.
PROBE = """
import importlib.util, json
import transformers, transformers.integrations.hub_kernels
import kernels
import emalora_fast.kernels.averager as averager
print(json.dumps({
    "spec": importlib.util.find_spec("kernels").origin,
    "kernels": kernels.__file__,
    "has_cuda_properties": hasattr(kernels, "CUDAProperties"),
    "ours": averager.__file__,
}))
"""


def _run(args: list[str], pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_kernels_folder(path: str) -> bool:
    folder = os.path.realpath(os.path.join(ROOT, "kernels"))
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


@pytest.mark.parametrize("mode", ["-c", "script", "-m"])
def test_kernels_resolves_to_the_installed_package_from_the_root(mode, tmp_path):
    pytest.importorskip("kernels")
    if mode == "-c":
        out = _run(["-c", PROBE])
    elif mode == "script":  # a script or notebook kept in the root: its folder is sys.path[0]
        script = os.path.join(ROOT, f"_probe_{os.getpid()}.py")
        with open(script, "w") as f:
            f.write(PROBE)
        try:
            out = _run([script])
        finally:
            os.remove(script)
    else:  # python -m from the root puts the root (cwd) first on sys.path, before PYTHONPATH
        (tmp_path / "emalora_probe.py").write_text(PROBE)
        out = _run(["-m", "emalora_probe"], pythonpath=str(tmp_path))
    assert not _in_kernels_folder(out["spec"]), out
    assert not _in_kernels_folder(out["kernels"]), out
    assert out["has_cuda_properties"], out
    # ...while the project's kernels are the repository's own files (editable) or installed copies.
    assert out["ours"].endswith(os.path.join("emalora_fast", "kernels", "averager.py")), out
