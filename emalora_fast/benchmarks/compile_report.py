"""``emalora-fast bench --compile-report``: the compiled structure of every kernel, and the
byte/FLOP floor each kernel has on the GPUs this project targets.

The compile part runs ``emalora_fast.kernels.compile_check`` (ahead-of-time compilation for sm_90
and sm_80 with the ptxas of the triton wheel; no GPU needed) on the default configurations and
prints registers, spills, shared memory, blocks per SM and the SASS instruction mix that matters:
global load/store widths, atomics and fences, tensor-core instructions.

The model part is arithmetic, not a measurement: for each kernel at the default shapes, the bytes
that must cross DRAM at the least (each input read once, each output written once; what a kernel
reads again is counted where the design makes it unavoidable), the tensor-core FLOPs, the
transcendental (exp/log) count, and the time each takes at the nominal peak of H100 SXM, H200 and
A100 SXM. The largest of the three is the floor a measured time should be compared with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

# Nominal peaks (vendor datasheets, dense): DRAM bandwidth, bf16 tensor-core FLOP/s, and the
# special-function (MUFU: exp2, log2) rate of 16 per SM per clock at the boost clock.
DEVICES = {
    "H100 SXM": dict(bw=3.35e12, tc=989e12, sfu=16 * 132 * 1.98e9),
    "H200": dict(bw=4.8e12, tc=989e12, sfu=16 * 132 * 1.98e9),
    "A100 SXM": dict(bw=2.039e12, tc=312e12, sfu=16 * 108 * 1.41e9),
}
LORA_ELEMENTS = 41_943_040  # Llama-3-8B all-linear LoRA r = 16 (448 tensors)
N, V, H = 8192, 128256, 4096


@dataclasses.dataclass
class Model:
    kernel: str
    bytes: float  # DRAM bytes that must move
    flops: float  # tensor-core FLOPs (2 per multiply-add)
    sfu: float  # exp / log evaluations
    note: str = ""

    def floors_ms(self, dev: dict) -> tuple[float, float, float]:
        return (1e3 * self.bytes / dev["bw"], 1e3 * self.flops / dev["tc"],
                1e3 * self.sfu / dev["sfu"])  # fmt: skip


def models() -> list[Model]:
    """The byte/FLOP model of each kernel at the default shapes (bf16 data, fp32 shadows)."""
    nv = N * V
    nvh = N * V * H
    ng = N // 64  # token blocks of the gradient passes
    inputs = 2 * N * H * 2 + V * H * 2  # h_s, h_t, W (shared head), each read once
    # gemm form: the g kernel, grad_h = g W, grad_W (+)= g^T h over row chunks the size of grad_W
    chunks = -(-(N * V) // (V * H))
    gemm_bytes = (
        inputs
        + N * V * 2  # g written
        + N * V * 2
        + V * H * 2
        + N * H * 2  # g W: g, W read, grad_h written
        + N * V * 2
        + N * H * 2
        + V * H * 2  # g^T h: g, h read, grad_W written
        + (chunks - 1) * V * H * 4
    )  # grad_W read and written again per extra chunk
    # atomic form: grouped order keeps 16 token blocks' grad_h rows in L2; grad_W and W are
    # swept once per group; every tile adds (BLOCK_N + BLOCK_V) H fp32 values atomically.
    gw_sweeps = -(-ng // 16)
    g_atomic_l2 = ng * (V // 128) * (64 + 128) * H * 4 * 2
    atomic_bytes = (
        2 * N * H * 2
        + gw_sweeps * V * H * 2 * 2  # h; W for z and for g W
        + (N + V) * H * 4  # zero-filled fp32 buffers
        + N * H * 4 * 2
        + gw_sweeps * V * H * 4 * 2  # grad_h, grad_W to/from DRAM
        + (N + V) * H * 6
    )  # fp32 -> bf16 cast copies
    return [
        Model("averager BEMA, bf16 theta + bf16 teacher", LORA_ELEMENTS * (2 + 4 + 4 + 4 + 4 + 2),
              0, 0, "reads theta, ema, theta_0; writes ema, output, teacher"),
        Model("averager BEMA, fp32 theta + fp32 teacher", LORA_ELEMENTS * 24, 0, 0,
              "the project's goal counts 20 B/element without the teacher"),
        Model("averager EMA, bf16 theta", LORA_ELEMENTS * (2 + 4 + 4), 0, 0),
        Model("averager EMA, 8 profiles, bf16 theta", LORA_ELEMENTS * (2 + 8 * 8), 0, 0,
              "theta read once; each shadow read and written"),
        Model("loss fwd (KL), bf16 [N, V]", nv * 4, 0, nv * 3,
              "s and t read once; 2-3 exp per entry"),
        Model("loss fwd (JSD), bf16 [N, V]", nv * 8, 0, nv * 7, "a second pass for KL(.||M)"),
        Model("loss bwd, bf16 [N, V]", nv * 6, 0, nv * 2, "s, t read; dL/ds written"),
        Model("fused stats, shared head", 2 * N * H * 2 + V * H * 2, 4 * nvh, nv * 3,
              "h_s, h_t, W once (W tiles shared through L2 by the token blocks)"),
        Model("fused jsd pass 2, shared head", 2 * N * H * 2 + V * H * 2, 4 * nvh, nv * 7),
        Model("fused grad, gemm form (kernel + 2 GEMMs)", gemm_bytes, 8 * nvh, nv * 3,
              f"g [N, V] bf16 written once and read by both GEMMs; {chunks} row chunks"),
        Model("fused bwd, atomic form", atomic_bytes, 8 * nvh, nv * 3,
              f"plus {g_atomic_l2 / 1e9:.0f} GB of fp32 atomic read-modify-write through L2; "
              f"grad_W swept {gw_sweeps}x; fp32 buffers and their cast copies"),
    ]  # fmt: skip


def model_table() -> str:
    lines = [
        "Byte/FLOP model: an ESTIMATE from nominal peaks, not a measurement. Floors in ms "
        "(memory / tensor core / exp-log); the largest of the three bounds a measured time.",
        f"Shapes: averager {LORA_ELEMENTS / 1e6:.1f} M elements; loss N={N}, V={V}; "
        f"fused N={N}, H={H}, V={V}.",
        "",
        "| kernel | GB moved | TFLOP | G exp/log | " + " | ".join(DEVICES) + " | note |",
        "|---|---:|---:|---:|" + "---:|" * len(DEVICES) + "---|",
    ]
    for m in models():
        cells = []
        for dev in DEVICES.values():
            mem, tc, sfu = m.floors_ms(dev)
            cells.append(f"{mem:.2f} / {tc:.2f} / {sfu:.2f}")
        lines.append(f"| {m.kernel} | {m.bytes / 1e9:.2f} | {m.flops / 1e12:.1f} | "
                     f"{m.sfu / 1e9:.2f} | " + " | ".join(cells) + f" | {m.note} |")  # fmt: skip
    return "\n".join(lines)


def _widths(sass: dict, op: str) -> str:
    """``count x bits`` of the accesses of ``op`` ("LDG", "STG"), widest first."""
    keys = sorted((k for k in sass if k.startswith(op + ".")), key=lambda k: -int(k[len(op) + 1 :]))
    return " ".join(f"{sass[k]}x{k[len(op) + 1 :]}" for k in keys) or "-"


def compile_table(rows: list[dict]) -> str:
    head = ("| case | sm | regs | spill B | shared B | blocks/SM | LDG (count x bits) | "
            "LDGSTS | STG | RED / ATOM / MEMBAR.GPU | HMMA / HGMMA |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['arch']} | compile error: {r['error'][:80]} |")
            continue
        s = r["sass"]
        red = s.get("REDG", 0) + s.get("RED", 0)
        atom = s.get("ATOMG", 0) + s.get("ATOM", 0)
        spill = "?" if r["spill_stores"] is None else r["spill_stores"] + r["spill_loads"]
        lines.append(
            f"| {r['case']} | {r['arch']} | {r['registers']} | {spill} | {r['shared']} | "
            f"{r['blocks_per_sm']} | {_widths(s, 'LDG')} | {_widths(s, 'LDGSTS')} | "
            f"{_widths(s, 'STG')} | "
            f"{red} / {atom} / {s.get('MEMBAR.GPU', 0)} | {s.get('HMMA', 0)} / "
            f"{s.get('HGMMA', 0)} |"
        )
    return "\n".join(lines)


def run_compile_check(subset: str = "default", python: str | None = None) -> dict:
    """The compile check's JSON, from a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "compile.json")
        cmd = [python or sys.executable, "-m", "emalora_fast.kernels.compile_check", "--subset",
               subset, "--output", out]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def compile_report(subset: str = "default") -> str:
    data = run_compile_check(subset)
    return "\n".join([
        f"# Compile report (triton {data['triton']}, {len(data['rows'])} compiles in "
        f"{data['seconds']} s; ahead of time for sm_90 and sm_80, no GPU involved)",
        "",
        compile_table(data["rows"]),
        "",
        model_table(),
    ])  # fmt: skip
