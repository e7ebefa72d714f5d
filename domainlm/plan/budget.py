"""The compute budget of a plan: the recipe's plan section and the command line's options
resolved into FLOPs and the hardware that spends them (an accelerator from the table, or this
machine measured by a probe)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from domainlm.errors import UserError
from domainlm.plan import hardware
from domainlm.plan.output import si
from domainlm.recipe import PlanConfig, Recipe

BUDGET_KEYS = ("flops", "hours", "minutes")
HARDWARE_KEYS = ("gpu", "gpus", "mfu")
CLI_FLAGS = {k: f"--{k}" for k in ("flops", "gpu", "gpus", "hours", "mfu", "minutes", "law", "fit")}


@dataclass
class Hardware:
    """Where the training runs: a named accelerator from the table, or this machine (probed)."""

    name: str
    device: str  # "cuda" (any accelerator) or "cpu"
    devices: int
    memory_bytes: int  # per device
    flops_per_s: float  # per device, what training is expected to achieve
    peak_flops: float | None = None
    mfu: float | None = None
    source: str = ""
    probe: dict | None = None
    model_probe: dict | None = None  # the planned model's own timed steps (wall-clock budgets)
    model_probes: list[dict] | None = None  # every shape timed while planning

    def describe(self) -> str:
        if self.peak_flops is not None:
            return (
                f"{self.devices} x {self.name} ({self.peak_flops / 1e12:,.0f} TFLOP/s peak bf16 "
                f"dense, MFU {self.mfu:.2f})"
            )
        return (
            f"this machine: {self.name} ({self.device}), measured "
            f"{si(self.flops_per_s)}FLOP/s in bf16"
        )


class Settings:
    """The recipe's plan section with the command line's options applied, and where each is from."""

    def __init__(self, recipe: Recipe, overrides: dict[str, Any]):
        self.recipe = recipe
        self.cli = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(self.cli) - set(CLI_FLAGS)
        if unknown:
            raise UserError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
        base = dataclasses.asdict(recipe.plan)
        if any(k in self.cli for k in BUDGET_KEYS):
            # A budget on the command line replaces the recipe's budget as a whole; the
            # recipe's hardware (gpu, gpus, mfu) still applies to a --flops or --hours budget.
            for k in BUDGET_KEYS:
                base[k] = None
        self.values = {**base, **self.cli}
        self.plan = PlanConfig(**self.values)

    def where(self, key: str) -> str:
        if key in self.cli:
            return CLI_FLAGS[key]
        return f"{self.recipe.path or 'the recipe'}: plan.{key}"

    def budget_kinds(self) -> list[str]:
        return [k for k in BUDGET_KEYS if self.values.get(k) is not None]


# --------------------------------------------------------------------------------------------
# Budget and hardware.


def _positive(settings: Settings, key: str, integer: bool = False) -> None:
    value = settings.values[key]
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{settings.where(key)} must be a number, got {value!r}")
    if value <= 0:
        raise UserError(f"{settings.where(key)} must be > 0, got {value:g}")
    if integer and int(value) != value:
        raise UserError(f"{settings.where(key)} must be a whole number, got {value:g}")


def resolve_hardware(
    settings: Settings, previous: dict | None, force: bool, notes: list[str]
) -> tuple[str, float, str, Hardware]:
    """(budget kind, budget FLOPs, description, hardware), or a UserError naming the fix."""
    for key in ("flops", "hours", "minutes", "mfu", "max_epochs", "global_batch_tokens"):
        _positive(settings, key)
    for key in ("gpus", "seq_len"):
        _positive(settings, key, integer=True)
    p = settings.plan
    if p.mfu > 1:
        raise UserError(f"{settings.where('mfu')} is a fraction of peak (0-1], got {p.mfu:g}")
    kinds = settings.budget_kinds()
    choices = "--flops F, --gpu NAME --gpus N --hours H [--mfu U], or --minutes M"
    if not kinds:
        extra = f" (--gpu {p.gpu} needs --hours)" if p.gpu else ""
        raise UserError(
            f"no compute budget{extra}: give one of {choices}, or set plan.flops, "
            "plan.gpu + plan.hours, or plan.minutes in the recipe"
        )
    if len(kinds) > 1:
        named = " and ".join(settings.where(k) for k in kinds)
        raise UserError(f"give one compute budget, not two: {named}; choose one of {choices}")
    kind = kinds[0]
    if kind == "minutes":
        cli_hw = [CLI_FLAGS[k] for k in HARDWARE_KEYS if k in settings.cli]
        if cli_hw:
            raise UserError(
                f"--minutes measures this machine; {', '.join(cli_hw)} describe accelerators: "
                "give --hours with them instead"
            )
        if p.gpu:
            notes.append(f"plan.gpu ({p.gpu}) is ignored: --minutes measures this machine")
        hw = _local(previous, force)
        flops = hw.flops_per_s * hw.devices * p.minutes * 60
        return kind, flops, f"{p.minutes:g} min on this machine, {flops:.3g} FLOPs", hw
    if kind == "hours" and not p.gpu:
        raise UserError(
            f"{settings.where('hours')} needs a gpu: add --gpu NAME (one of "
            f"{', '.join(sorted(hardware.ACCELERATORS))}), or use --minutes for this machine"
        )
    if p.gpu:
        acc = hardware.accelerator(p.gpu)
        hw = Hardware(
            name=acc.name,
            device="cuda",
            devices=p.gpus,
            memory_bytes=acc.memory_bytes,
            flops_per_s=acc.peak_flops * p.mfu,
            peak_flops=acc.peak_flops,
            mfu=p.mfu,
            source=f"{acc.description}: {acc.source}",
        )
        if acc.name == "v100":
            notes.append("the V100 has no bf16: train it with precision 16-mixed (same memory)")
    else:
        hw = _local(previous, force)
        notes.append("no --gpu given: memory and time are for this machine")
    if kind == "hours":
        flops = hw.devices * hw.flops_per_s * p.hours * 3600
        desc = f"{p.gpus} x {hw.name} x {p.hours:g} h at MFU {p.mfu:g}, {flops:.3g} FLOPs"
        return kind, flops, desc, hw
    return kind, float(p.flops), f"{p.flops:.3g} FLOPs", hw


def _local(previous: dict | None, force: bool) -> Hardware:
    """This machine, measured by the probe, or the measurement in plan.json from this machine.

    Reusing it keeps `make plan` stable: a second probe on a busy machine could give another
    speed, hence another model shape, and make every later stage rebuild.
    """
    old = ((previous or {}).get("hardware") or {}).get("probe")
    probe = None
    if not force and old and old.get("machine") == hardware.machine_fingerprint():
        try:
            probe = hardware.Probe(**old)
        except TypeError:  # stored by another version of the probe
            probe = None
    if probe is None:
        probe = hardware.probe()
    return Hardware(
        name=probe.name,
        device=probe.device,
        devices=probe.devices,
        memory_bytes=probe.memory_bytes,
        flops_per_s=probe.flops_per_s,
        source=f"probe: {probe.steps} training steps of a 1-block transformer in {probe.dtype}",
        probe=probe.to_dict(),
    )
