"""`make bench` section `gpu`: the GPU check's figures (scripts/gpu_check.py, `make gpu-check`).
The CPU mode is run here (tiny sizes: it proves the path, its figures are not GPU figures);
bench/gpu_check.json, written by `make gpu-check` on a GPU machine, is rendered when it
exists, with the device named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import commit, machine, table, write_section

GPU_FILE = Path("bench/gpu_check.json")
CPU_FILE = Path("build/gpu-check/gpu_check_cpu.json")
GOALS = {"gpu-125m": 0.45, "gpu-1b": 0.55}  # MFU goals on one H100-class GPU (issue 16)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(report: dict) -> str:
    """One table of the runs of a gpu_check JSON file."""
    rows = []
    for r in report["runs"]:
        if r.get("error"):
            rows.append([r["name"], "-", "-", "-", "-", "-", "-", "-", f"error: {r['error']}"])
            continue
        ratio = r["peak_memory_bytes"] / r["predicted_memory_bytes"]
        rows.append([
            r["name"], f"{r['params']:,}", f"{r['devices']} x {r['strategy']}",
            f"{r['micro_batch']} x {r['grad_accum']} x {r['seq_len']}",
            f"{r['tokens_per_s']:,.0f}",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            _size(r["peak_memory_bytes"]), _size(r["predicted_memory_bytes"]),
            f"measured / predicted {ratio:.2f}" if report["mode"] == "gpu"
            else "RSS: not comparable",
        ])
    head = (f"Device: **{report['device']}**" + (f" x {report['gpus']}" if report["gpus"] else "")
            + f" ({report['cpu_cores']} CPU cores), Python {report['python']}, torch "
            f"{report['torch']}, lightning {report['lightning']}; `{report['command']}`, "
            f"{report['started']}, {report['wall_seconds']} s in all.")
    peak = report.get("peak_flops_per_device")
    note = (f"MFU: PaLM's FLOPs per token (6N + 12·L·d·s) x tokens/s over the device's dense "
            f"bf16 peak ({peak / 1e12:.1f} TFLOP/s)." if peak else
            "MFU: none, no bf16 peak is known for this device.")
    return "\n\n".join([head, table(
        ["run", "params", "devices x strategy", "batch (micro x accum x seq)", "tokens/s", "MFU",
         "peak memory", "memory model", "note"], rows), note])


def main(quick: bool = False) -> None:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu", "--out",
                           str(CPU_FILE)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr)
        raise SystemExit("bench gpu: the CPU mode of scripts/gpu_check.py failed")
    write()


def write() -> None:
    """The section from bench/gpu_check.json (when it exists) and the CPU mode's file."""
    parts = ["## GPU check (`make gpu-check`)", ""]
    if GPU_FILE.is_file():
        gpu = json.loads(GPU_FILE.read_text(encoding="utf-8"))
        goals = ", ".join(f"{k} >= {v:.0%}" for k, v in GOALS.items())
        parts += [f"### On {gpu['device']}", "", render(gpu), "",
                  f"Goals on one H100-class GPU: MFU {goals}. Peak memory is "
                  "`torch.cuda.max_memory_allocated`; the memory model is "
                  "`domainlm/plan/memory.py` for the same shape, batch, precision, strategy and "
                  "checkpointing.", ""]
    else:
        parts += ["No GPU figures yet: `make gpu-check` on a GPU machine writes "
                  f"`{GPU_FILE}`, which this section then renders.", ""]
    cpu = json.loads(CPU_FILE.read_text(encoding="utf-8"))
    parts += ["### CPU mode (the path, not GPU figures)", "",
              f"Machine: {machine()}. Commit {commit()}. Command: `python -m bench gpu` "
              "(runs `python scripts/gpu_check.py --cpu`: each recipe's shape cut to 2 layers of "
              "64, vocabulary 512, 32-token sequences; peak memory is the process's max RSS, "
              "mostly the libraries, so the memory model's figure is not comparable there).",
              "", render(cpu)]
    write_section("gpu", "\n".join(parts))
    print("bench gpu: wrote the gpu section of docs/benchmarks.md")
