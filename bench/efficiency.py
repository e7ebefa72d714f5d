"""Token-efficiency benchmark: how many training tokens the candidate recipe (Muon on the hidden
matrices + warmup-stable-decay) needs to reach the validation loss the baseline (AdamW + warmup
+ cosine, today's defaults) ends at, on the same model, data and batches, at two sizes and
several seeds (CPU).

The candidate's budgets share one trunk: a WSD run of B steps is flat at the peak rate until its
decay starts, whatever B, so one run at the peak rate is branched into a decay at each budget's
decay start (the same weights, optimizer state and batches a run of that budget alone would have
there) — the way a WSD run is extended from its checkpoints (docs/pretrain.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from bench.common import commit, machine, table, write_section
from bench.efficiency_data import Streams, load
from domainlm.model.llama import Llama
from domainlm.recipe import TrainConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.train import optim

WORK = Path("build/bench/efficiency")
TARGET = 0.5  # the goal: the candidate needs at most half the baseline's tokens
SEEDS = (1, 2, 3)
VAL_WINDOWS = 64
# The candidate's budgets, as fractions of the baseline's tokens.
FRACTIONS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0)


@dataclass(frozen=True)
class Size:
    name: str
    config: LlamaConfig
    micro_batch: int
    seq_len: int
    steps: int  # the baseline's budget, in optimizer steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len


def _llama(layers: int, d: int, heads: int, ffn: int, vocab: int = 2048) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, n_layers=layers, d_model=d, n_heads=heads,
                       n_kv_heads=heads, ffn_dim=ffn, max_seq_len=128)


# The demo's planned shape (recipes/demo.yaml on this machine: 6 x 64, one head, ffn 192) and a
# ~2.2M-parameter one, at 8 x 128 tokens a step: small budgets that a shared 2-core CPU affords
# for 3 seeds of both recipes (token counts are what this measures, not time).
SIZES = [
    Size("demo", _llama(6, 64, 1, 192), micro_batch=8, seq_len=128, steps=250),
    Size("2.2M", _llama(4, 192, 3, 512), micro_batch=8, seq_len=128, steps=150),
]

# The demo recipe's train: section (lr 3e-3; every other field the recipe default): AdamW,
# warmup 2% + cosine to 0.1, weight decay 0.1, betas (0.9, 0.95), clip 1.0, bf16-mixed.
BASELINE = TrainConfig(lr=3e-3)
CANDIDATE = dataclasses.replace(BASELINE, optimizer="muon", schedule="wsd")


def candidate_config() -> TrainConfig:
    """The candidate as the recipes get it (its lr settings: docs/pretrain.md)."""
    return CANDIDATE


@dataclass
class Trainer:
    """A plain loop with `make pretrain`'s math: bf16-mixed autocast, the recipe's optimizer,
    clipping and schedule; batch of step s from (seed, s)."""

    size: Size
    cfg: TrainConfig
    data: Streams
    seed: int
    warmup: int

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = Llama(self.size.config)
        self.model.train()
        self.opt = optim.make_optimizer(self.model, self.cfg, fused=True)
        self.step = 0

    def run(self, until: int, total: int) -> None:
        """Train steps self.step .. until - 1 on the schedule of a `total`-step run."""
        cfg, warmup, start = self.cfg, self.warmup, self.step
        for group in self.opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        schedule = LambdaLR(self.opt, lambda s: optim.lr_factor(s + start, total, warmup, cfg))
        s = self.size
        for step in range(start, until):
            x, y = self.data.batch(self.seed, step, s.micro_batch, s.seq_len)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            schedule.step()
        self.step = until

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        s, total, n = self.size, 0.0, 0
        for x, y in self.data.val_batches(VAL_WINDOWS, s.micro_batch, s.seq_len):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = self.model(x, y)
            total += float(loss) * y.numel()
            n += y.numel()
        self.model.train()
        return total / n

    def branch(self) -> Trainer:
        return copy.deepcopy(self)


def baseline(size: Size, data: Streams, seed: int) -> float:
    """The baseline's final validation loss."""
    warmup = optim.warmup_steps(BASELINE, size.steps)
    t = Trainer(size, BASELINE, data, seed, warmup)
    t.run(size.steps, size.steps)
    return t.val_loss()


def candidate(size: Size, data: Streams, seed: int, cfg: TrainConfig,
              fractions=FRACTIONS) -> dict[int, float]:
    """The candidate's final validation loss at each budget (steps -> loss), from one trunk
    at the peak rate and a decay branch per budget. The warmup is the baseline's (a fixed step
    count, so every budget shares it)."""
    warmup = optim.warmup_steps(BASELINE, size.steps)
    budgets = sorted({max(warmup + 2, round(f * size.steps)) for f in fractions})
    trunk = Trainer(size, cfg, data, seed, warmup)
    out = {}
    for b in budgets:
        start = optim.decay_start(cfg, b, warmup)
        trunk.run(start, budgets[-1])  # every step before the decay: lr factor of any budget
        branch = trunk.branch()
        branch.run(b, b)
        out[b] = branch.val_loss()
    return out


def steps_to_reach(losses: dict[int, float], target: float) -> float | None:
    """The first budget whose loss is <= target, interpolated (in log steps) between the
    budgets around it; None if no budget reaches it."""
    prev = None
    for b, loss in sorted(losses.items()):
        if loss <= target:
            if prev is None:
                return float(b)
            pb, pl = prev
            frac = (pl - target) / (pl - loss) if pl > loss else 1.0
            return math.exp(math.log(pb) + frac * (math.log(b) - math.log(pb)))
        prev = (b, loss)
    return None


@dataclass
class SizeResult:
    size: Size
    base_losses: list[float]
    cand_losses: list[dict[int, float]]  # per seed: budget -> loss

    def ratios(self) -> list[float | None]:
        out = []
        for target, losses in zip(self.base_losses, self.cand_losses, strict=True):
            s = steps_to_reach(losses, target)
            out.append(None if s is None else s / self.size.steps)
        return out

    def median_ratio(self) -> float | None:
        r = self.ratios()
        # A seed that never reached the target counts as more than the largest budget.
        vals = [x if x is not None else math.inf for x in r]
        m = statistics.median(vals)
        return None if math.isinf(m) else m


def measure(size: Size, data: Streams, cfg: TrainConfig, seeds=SEEDS,
            fractions=FRACTIONS) -> SizeResult:
    base, cand = [], []
    for seed in seeds:
        base.append(baseline(size, data, seed))
        cand.append(candidate(size, data, seed, cfg, fractions))
        print(f"efficiency {size.name} seed {seed}: baseline {base[-1]:.4f}, candidate "
              + ", ".join(f"{b}:{v:.4f}" for b, v in cand[-1].items()), flush=True)
    return SizeResult(size, base, cand)


def _measure_in_worker(size: Size, work: Path, cfg: TrainConfig, seeds) -> SizeResult:
    torch.set_num_threads(1)
    return measure(size, load(work), cfg, seeds)


def _fmt_ratio(r: float | None, top: float) -> str:
    return f"> {top:.2f}" if r is None else f"{r:.2f}"


def report(results: list[SizeResult], cfg: TrainConfig, seconds: float, quick: bool) -> str:
    rows = []
    for res in results:
        s, c = res.size, res.size.config
        tokens = s.steps * s.tokens_per_step
        ratios = res.ratios()
        med = res.median_ratio()
        top = max(FRACTIONS)
        cand_at_full = [d[max(d)] for d in res.cand_losses]
        rows.append([
            s.name, f"{c.num_params():,}",
            f"{c.n_layers} x {c.d_model}, {c.n_heads} head(s), ffn {c.ffn_dim}, "
            f"vocab {c.vocab_size}",
            f"{tokens:,} ({s.steps} x {s.tokens_per_step:,})",
            f"{statistics.median(res.base_losses):.3f}",
            f"{statistics.median(cand_at_full):.3f}",
            ", ".join(("<= " if d[min(d)] <= t else "") + _fmt_ratio(r, top)
                      for r, d, t in zip(ratios, res.cand_losses, res.base_losses, strict=True)),
            f"{'n/a' if med is None else f'{med * tokens:,.0f}'}",
            f"**{_fmt_ratio(med, top)}**",
        ])
    met = [r.median_ratio() is not None and r.median_ratio() <= TARGET for r in results]
    verdict = "met" if all(met) else ("not met" if not any(met) else "met at " + ", ".join(
        r.size.name for r, m in zip(results, met, strict=True) if m) + " only")
    if quick:
        verdict += " (a smoke run: too few steps to judge)"
    header = (
        "## Token efficiency (optimizer and schedule, CPU)\n\n"
        f"Machine: {machine()}. Commit {commit()}. Command: `python -m bench efficiency"
        f"{' --quick' if quick else ''}` ({len(results[0].base_losses)} seeds, "
        f"{time.strftime('%Y-%m-%d')}; the section took {seconds:.0f} s, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}). torch {torch.__version__}.\n"
    )
    body = (
        "Data: the demo's text (the standard library's documentation), a 2048-piece "
        "SentencePiece vocabulary trained on it, 1 document in 20 held out; the same batches "
        "(a function of seed and step) for every run. **Baseline**: the demo recipe's train "
        f"section, today's defaults: AdamW (lr {BASELINE.lr:g}, betas {BASELINE.betas}, weight "
        f"decay {BASELINE.weight_decay:g}), warmup 2% + cosine to {BASELINE.min_lr_ratio:g}x, "
        "clip 1.0, bf16-mixed. **Candidate**: `optimizer: muon, schedule: wsd` — Muon "
        f"(muon_lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum:g}, weight decay "
        f"{cfg.muon_weight_decay:g}) on the blocks' attention and MLP matrices, AdamW as the "
        f"baseline's on embeddings and norms, warmup-stable-decay (decay over the last "
        f"{cfg.decay_fraction:.0%} to {cfg.min_lr_ratio:g}x). The candidate is trained at "
        "budgets of " + ", ".join(f"{f:.2f}" for f in FRACTIONS) + " of the baseline's tokens "
        "(one WSD trunk, a decay branch per budget: each the same run as that budget alone); "
        "its tokens to reach the baseline's final validation loss are interpolated between the "
        "budgets around it (log scale), per seed (\"<=\": the smallest budget already reached "
        "it); the ratio is those tokens over the baseline's. "
        "Validation: the same 64 windows of 128 tokens for every run.\n\n"
    )
    tab = table(
        ["model", "params", "shape", "baseline tokens (steps x tokens)",
         "baseline final val loss (median)", "candidate val loss at the same tokens (median)",
         "ratio per seed", "candidate tokens to baseline loss (median)", "ratio (median)"],
        rows,
    )
    tail = (f"\n\nTarget: the candidate reaches the baseline's loss in at most "
            f"{TARGET:.0%} of its tokens at every size: **{verdict}**.\n")
    return header + "\n" + body + tab + tail


def run(quick: bool = False, sizes: list[Size] | None = None, work: Path = WORK,
        seeds=SEEDS, cfg: TrainConfig | None = None) -> str:
    cfg = cfg or candidate_config()
    t0 = time.perf_counter()
    if sizes is None:
        sizes = SIZES
        if quick:
            sizes = [dataclasses.replace(s, steps=20) for s in SIZES]
            seeds = seeds[:1]
    load(work)  # built once, before the workers read it
    # One process per size (each single-threaded): the results do not depend on the split.
    with ProcessPoolExecutor(max_workers=len(sizes)) as pool:
        futures = [pool.submit(_measure_in_worker, s, work, cfg, seeds) for s in sizes]
        results = [f.result() for f in futures]
    return report(results, cfg, time.perf_counter() - t0, quick)


def main(quick: bool = False) -> None:
    body = run(quick)
    write_section("efficiency", body)
    print(body)
