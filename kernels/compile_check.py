"""Ahead-of-time compilation of this package's kernels for GPUs that need not be present.

:func:`compile_launch` compiles a :class:`~._launch.Launch` for a CUDA target (sm_90: H100/H200,
sm_80: A100) the way ``kernel[grid](...)`` would on that device: the arguments go through the
kernel's own binder (``JITFunction``'s), so pointer and integer arguments get the same
divisibility-16 specialization and the same compile-time constants a real launch gets, and
``triton.compile`` runs with the ptxas of the triton wheel. :func:`analyze` reads the result:
registers, shared and local memory, ptxas's spill report, and a histogram of the SASS
instructions that show the memory and tensor-core structure (load/store widths, atomics and
fences, mma/wgmma). The cases that enumerate every compile-time choice of the launchers live in
:mod:`.compile_cases`.

Run ``python -m emalora_fast.kernels.compile_check --help``; it needs ``TRITON_INTERPRET`` unset
(or 0), because the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

# Triton 3.9 warns that its fp-fusion default will change; the GPU machines' 3.6 fuses: say so.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ._launch import Launch  # noqa: E402

# Shared memory one block may use (the opt-in maximum): sm_90 227 KB, sm_80 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}
# Registers per SM and the most resident blocks / warps per SM (both targets).
REGS_PER_SM, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM = 65536, 32, 64
SHARED_PER_SM = {90: 233472, 80: 167936}

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_CACHE: dict[tuple, Compiled] = {}


@dataclasses.dataclass
class Compiled:
    """What the compile check keeps of one compiled kernel."""

    name: str
    arch: int
    num_warps: int
    seconds: float  # compile time (0 for an in-process cache hit)
    registers: int
    shared: int  # bytes of shared memory per block
    local: int  # bytes of local memory per thread (cuobjdump)
    stack: int  # bytes of stack frame per thread (cuobjdump)
    spill_stores: int | None  # bytes, from ptxas -v (None if ptxas did not run: disk cache hit)
    spill_loads: int | None
    sass: dict[str, int]  # instruction class -> count (see _classify)
    ptx_acq_rel_atomics: int  # atom/red instructions with acq_rel or acquire/release ordering
    ptx_relaxed_reds: int
    ttgir_async_copies: int  # async global -> shared copies in the TTGIR (software pipelining)

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers, warps and shared memory."""
        regs_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256  # allocation unit: 256
        by_regs = REGS_PER_SM // (regs_per_warp * self.num_warps)
        by_warps = MAX_WARPS_PER_SM // self.num_warps
        by_shared = SHARED_PER_SM[self.arch] // (self.shared + 1024) if self.shared else 99
        return max(0, min(by_regs, by_warps, by_shared, MAX_BLOCKS_PER_SM))

    def width_count(self, op: str, bits: int) -> int:
        return self.sass.get(f"{op}.{bits}", 0)

    def narrow(self, op: str) -> int:
        """Global accesses of ``op`` ("LDG" or "STG") narrower than 128 bits."""
        return sum(self.width_count(op, b) for b in (8, 16, 32, 64))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks_per_sm"] = self.blocks_per_sm
        return d


# ------------------------------------------------------------------------------------------------
# Compiling.
# ------------------------------------------------------------------------------------------------
def _bind(launch: Launch, target: GPUTarget):
    """Signature, constants, attributes and options exactly as ``JITFunction.run`` forms them."""
    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, **launch.options)
    kwargs["debug"] = fn.debug or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):  # triton >= 3.7
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile ``launch`` for sm_``arch``; each distinct specialization once per process."""
    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = _bind(launch, target)
    key = (
        launch.kernel.fn.__module__,
        launch.kernel.fn.__qualname__,
        arch,
        repr(sorted(signature.items())),
        repr(sorted((k, repr(v)) for k, v in constexprs.items())),
        repr(sorted(attrs.items())),
        repr(sorted(options.__dict__.items())),
    )
    if key in _CACHE:
        return dataclasses.replace(_CACHE[key], seconds=0.0)
    log = io.StringIO()
    t0 = time.perf_counter()
    old = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(launch.kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    finally:
        triton.knobs.nvidia.dump_ptxas_log = old
    seconds = time.perf_counter() - t0
    _CACHE[key] = analyze(kernel, launch.kernel.fn.__name__, arch, options.num_warps, seconds,
                          log.getvalue())  # fmt: skip
    return _CACHE[key]


# ------------------------------------------------------------------------------------------------
# Reading the compiled code.
# ------------------------------------------------------------------------------------------------
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def _classify(opcode: str) -> str | None:
    """Instruction class of a SASS opcode, or None for those the histogram leaves out."""
    head, *mods = opcode.split(".")
    if head in ("LDG", "STG", "LDGSTS", "LDL", "STL"):
        bits = next((_WIDTH[m] for m in mods if m in _WIDTH), 32)
        return f"{head}.{bits}"
    if head in ("REDG", "RED", "ATOMG", "ATOM", "MEMBAR", "ERRBAR", "CCTL", "HMMA", "HGMMA"):
        return f"{head}.GPU" if head == "MEMBAR" and "GPU" in mods else head
    if head.startswith("UTMA"):  # tensor-memory-accelerator copies
        return head
    return None


def sass_histogram(sass: str) -> dict[str, int]:
    counts = Counter(c for c in map(_classify, _OPCODE.findall(sass)) if c)
    return dict(sorted(counts.items()))


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def analyze(kernel, name: str, arch: int, num_warps: int, seconds: float, log: str) -> Compiled:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("nvdisasm", "-c", f.name)

    def field(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ptx = kernel.asm["ptx"]
    atomics = re.findall(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.M)
    ordered = [a for a in atomics if re.search(r"\.(acq_rel|acquire|release|sc)\b", a)]
    return Compiled(
        name=name,
        arch=arch,
        num_warps=num_warps,
        seconds=round(seconds, 3),
        registers=field("REG"),
        shared=int(kernel.metadata.shared),
        local=field("LOCAL"),
        stack=field("STACK"),
        spill_stores=int(spill.group(1)) if spill else None,
        spill_loads=int(spill.group(2)) if spill else None,
        sass=sass_histogram(sass),
        ptx_acq_rel_atomics=len(ordered),
        ptx_relaxed_reds=sum(1 for a in atomics if a.startswith("red") and ".relaxed" in a),
        ttgir_async_copies=len(re.findall(r"async_copy_global_to_local", kernel.asm["ttgir"])),
    )


# ------------------------------------------------------------------------------------------------
# Command line: compile the cases, print JSON (one object per case and target).
# ------------------------------------------------------------------------------------------------
def run_cases(subset: str, archs: tuple[int, ...]) -> list[dict[str, Any]]:
    from .compile_cases import cases

    rows = []
    for case in cases(subset):
        for arch in archs:
            row = {"case": case.name, "kernel": case.kernel, "arch": arch, "tags": case.tags,
                   "min_ldg128": case.min_ldg128, "min_stg128": case.min_stg128}  # fmt: skip
            try:
                launch = case.launch(arch)
                row["constexprs"] = {k: str(v) for k, v in launch.constexprs.items()}
                row["num_stages"] = launch.num_stages
                row.update(compile_launch(launch, arch).as_dict())
                row["error"] = None
            except Exception as exc:  # reported per case, so that one failure hides no other
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rows.append(row)
    return rows


def constexpr_names() -> dict[str, list[str]]:
    """Kernel name -> the names of its compile-time parameters (what the cases must cover)."""
    from . import averager, distill_loss, fused_linear, fused_linear_grad

    names = {}
    for mod in (averager, distill_loss, fused_linear, fused_linear_grad):
        for obj in vars(mod).values():
            if isinstance(obj, triton.runtime.JITFunction) and obj.fn.__name__.endswith("_kernel"):
                names[obj.fn.__name__] = [p.name for p in obj.params if p.is_constexpr]
    return names


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", default="all", help="all | default (the hot configurations)")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--output", help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    with tempfile.TemporaryDirectory() as cache:
        # A private Triton cache: every case is compiled (so ptxas reports its spills) once.
        triton.knobs.cache.dir = cache
        t0 = time.perf_counter()
        rows = run_cases(args.subset, tuple(args.arch))
        out = {"triton": triton.__version__, "seconds": round(time.perf_counter() - t0, 1),
               "constexprs": constexpr_names(), "rows": rows}  # fmt: skip
    text = json.dumps(out, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
