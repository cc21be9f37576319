"""Ahead-of-time compilation of every Triton kernel for sm_90 (H100/H200) and sm_80 (A100).

No GPU is needed: ``emalora_fast.kernels.compile_check`` compiles the cases of
``kernels/compile_cases.py`` (every kernel, in the compile-time configurations its launcher can
choose, through the launcher's own ``*_launch`` function and the kernel's own argument binding)
with the ptxas of the triton wheel, and reports registers, spills, shared memory and a SASS
instruction histogram. It runs in a subprocess without TRITON_INTERPRET, once per triton version:
the dev install's (all cases) and, where ``make test`` created it, a triton 3.6 environment (the
GPU machines' version; the default configurations). Each distinct specialization is compiled once
per run.

What is checked: everything compiles; no spills on sm_90 in the default configurations; 128-bit
global loads and stores on the hot streams of the aligned memory-bound cases; tensor-core
instructions (wgmma / mma) in the bf16 dot kernels; no acq_rel (fenced) atomics; shared memory
within the target's limit; the split heuristic's blocks-per-SM against the compiled occupancy;
and that the cases take every value of every compile-time switch of every kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block: sm_90 227 KB, sm_80 163 KB
TIMEOUT = 1800


def _triton36_python() -> str | None:
    path = os.environ.get("EMALORA_TRITON36_PYTHON") or str(ROOT / ".venv-triton36/bin/python")
    return path if Path(path).exists() else None


# The dev triton compiles every case (about 4-5 minutes on two cores), triton 3.6 the default
# configurations; EMALORA_COMPILE_SUBSET=default cuts the first to the default ones too.
VERSIONS = {
    "dev": (sys.executable, os.environ.get("EMALORA_COMPILE_SUBSET", "all")),
    "triton36": (_triton36_python(), "default"),
}


@pytest.fixture(scope="module", params=list(VERSIONS))
def report(request, tmp_path_factory) -> dict:
    """The compile check's JSON for one triton version (compiled once per test run)."""
    python, subset = VERSIONS[request.param]
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the compile check under triton 3.6: .venv-triton36 is missing")
        pytest.skip("no triton 3.6 environment (make test creates .venv-triton36)")
    out = tmp_path_factory.mktemp("compile") / f"{request.param}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [python, "-m", "emalora_fast.kernels.compile_check", "--subset", subset,
           "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    data["name"], data["subset"] = request.param, subset
    print(f"\ncompile check ({request.param}, triton {data['triton']}, {subset}): "
          f"{len(data['rows'])} compiles in {data['seconds']} s")  # fmt: skip
    return data


def _rows(report, tag: str | None = None, arch: int | None = None) -> list[dict]:
    return [r for r in report["rows"] if (tag is None or tag in r["tags"])
            and (arch is None or r["arch"] == arch) and r["error"] is None]  # fmt: skip


def _check(rows, bad, what: str) -> None:
    failures = [f"{r['case']} sm_{r['arch']}: {bad(r)}" for r in rows if bad(r)]
    assert not failures, f"{what}:\n" + "\n".join(failures[:30])


def test_every_case_compiles(report):
    assert report["rows"]
    _check(report["rows"], lambda r: r["error"], "compile errors")


def test_no_spills_on_sm90_default_configurations(report):
    rows = _rows(report, "default", 90)
    assert rows
    _check(rows, lambda r: (r["spill_stores"] is None and "no ptxas report")
           or (r["spill_stores"] + r["spill_loads"] and
               f"{r['spill_stores']} bytes spill stores, {r['spill_loads']} loads"),
           "spills")  # fmt: skip


def test_128bit_global_accesses_on_hot_streams(report):
    """The unmasked path of every aligned memory-bound case moves its streams in 128-bit
    accesses: at least the loads and stores per thread one full block needs (a pipelined loop
    loads with 128-bit cp.async, LDGSTS.128)."""
    rows = _rows(report, "vec")
    assert rows

    def bad(r):
        ld = r["sass"].get("LDG.128", 0) + r["sass"].get("LDGSTS.128", 0)
        st = r["sass"].get("STG.128", 0)
        if ld < r["min_ldg128"] or st < r["min_stg128"]:
            return f"LDG.128 {ld} (need {r['min_ldg128']}), STG.128 {st} (need {r['min_stg128']})"
        return None

    _check(rows, bad, "narrow hot-stream accesses")


def test_tensor_cores_in_dot_kernels(report):
    rows = _rows(report, "dot")
    assert rows
    op = {90: "HGMMA", 80: "HMMA"}
    _check(rows, lambda r: not r["sass"].get(op[r["arch"]]) and f"no {op[r['arch']]}",
           "no tensor-core instructions")  # fmt: skip


def test_no_acq_rel_atomics(report):
    """Atomics are relaxed reductions (REDG): no fenced atom.acq_rel, no GPU-wide MEMBAR."""

    def bad(r):
        fences = r["sass"].get("MEMBAR.GPU", 0) + r["sass"].get("ATOMG", 0)
        return (r["ptx_acq_rel_atomics"] or fences) and (
            f"{r['ptx_acq_rel_atomics']} ordered atomics, {fences} MEMBAR.GPU/ATOMG"
        )

    _check(_rows(report), bad, "ordered atomics")
    assert any(r["sass"].get("REDG") or r["sass"].get("RED") for r in _rows(report))


def test_shared_memory_within_limit(report):
    _check(_rows(report), lambda r: r["shared"] > SHARED_LIMIT[r["arch"]] and
           f"{r['shared']} bytes", "shared memory over the limit")  # fmt: skip


def test_split_heuristic_matches_compiled_occupancy(report):
    """The vocabulary-split heuristic of pass 1 assumes BLOCKS_PER_SM resident blocks at the
    default tiles: the compiled registers and shared memory must give exactly that."""
    from emalora_fast.kernels.fused_linear import BLOCKS_PER_SM

    rows = [r for r in _rows(report, "default") if r["kernel"] in
            ("_fused_linear_stats_kernel", "_fused_linear_jsd_kernel")]  # fmt: skip
    assert rows
    _check(rows, lambda r: r["blocks_per_sm"] != BLOCKS_PER_SM[r["arch"], False] and
           f"{r['blocks_per_sm']} blocks per SM, the heuristic assumes "
           f"{BLOCKS_PER_SM[r['arch'], False]}", "occupancy")  # fmt: skip


def test_every_switch_value_is_compiled(report):
    """Every compile-time switch of every kernel takes each of its values in some case (a new
    constexpr the cases do not vary fails here): bools both, DIVERGENCE 0/1/2, dtypes several."""
    if report["subset"] != "all":
        pytest.skip("the full case set runs under the dev triton (EMALORA_COMPILE_SUBSET=all)")
    seen: dict[str, dict[str, set]] = {}
    for r in _rows(report):
        for k, v in r["constexprs"].items():
            seen.setdefault(r["kernel"], {}).setdefault(k, set()).add(v)
    missing = []
    for kernel, names in report["constexprs"].items():
        for name in names:
            values = seen.get(kernel, {}).get(name, set())
            if name.startswith("BLOCK") or name == "GROUP_N":
                need = 1
            elif values <= {"True", "False"}:
                need = 2
            elif name == "DIVERGENCE":
                need = 3
            else:
                need = 2  # dtypes
            if len(values) < need:
                missing.append(f"{kernel}.{name}: only {sorted(values)}")
    assert not missing, "switch values never compiled:\n" + "\n".join(missing)
