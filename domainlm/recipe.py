"""Recipes: YAML files loaded into dataclasses and validated with messages that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from domainlm.errors import UserError


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------------
# Corpus section. Every field has a default; the comment after it is its documentation
# (docs/corpus.md is written from the same words).


@dataclass
class QualityFilters:
    """Gopher/C4-style document rules. Set any threshold to null to switch that rule off."""

    min_chars: int | None = 1  # documents shorter than this many characters are dropped
    max_chars: int | None = 1_000_000  # ... and longer than this
    min_words: int | None = 50  # Gopher: at least 50 words
    max_words: int | None = 100_000  # Gopher: at most 100,000 words
    min_mean_word_length: float | None = 3.0  # Gopher: mean word length within [3, 10]
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # ('#' + '...') per word
    max_bullet_lines: float | None = 0.9  # fraction of lines that start with a bullet
    max_ellipsis_lines: float | None = 0.3  # fraction of lines that end with an ellipsis
    min_alpha_words: float | None = 0.8  # fraction of words with an alphabetic character
    min_stop_words: int | None = 2  # English stop words (the, be, to, of, and, that, have, with)
    max_dup_line_fraction: float | None = 0.3  # lines that repeat, by count
    max_dup_para_fraction: float | None = 0.3  # paragraphs that repeat, by count
    max_dup_line_char_fraction: float | None = 0.2  # characters in repeated lines
    max_dup_para_char_fraction: float | None = 0.2  # characters in repeated paragraphs
    # Characters covered by the most frequent n-gram, for n = 2, 3, 4.
    max_top_ngram_char_fraction: dict[int, float] | None = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    # Characters covered by n-grams that occur more than once, for n = 5..10.
    max_dup_ngram_char_fraction: dict[int, float] | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    languages: list[str] | None = field(default_factory=lambda: ["en"])  # null: no language id
    min_language_score: float = 0.65  # langdetect probability of the detected language
    language_prefix_chars: int = 1000  # language id reads this many leading characters


@dataclass
class PIIConfig:
    """Personal data replaced by placeholders (<EMAIL>, <PHONE>, <IP>, <CARD>)."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    cards: bool = True  # only digit runs that pass the Luhn check


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose normalized text is identical
    near: bool = True  # drop near-duplicates found with MinHash LSH
    shingle: int = 5  # word n-gram size of the shingles
    num_perm: int = 128  # MinHash permutations
    threshold: float = 0.8  # Jaccard similarity at and above which documents are duplicates


@dataclass
class DecontamConfig:
    files: list[str] = field(default_factory=list)  # eval sets (JSONL with `text`, or .txt)
    ngram: int = 13  # word n-gram length, as GPT-3's decontamination
    max_overlap: float = 0.0  # drop a document sharing more than this fraction of its n-grams


@dataclass
class SourceConfig:
    name: str = ""  # the source's name in counts and reports
    kind: Literal["shards", "python-docs"] = "shards"
    path: str | None = None  # for shards: a folder (searched recursively) or a glob
    weight: float | None = None  # target share of training characters after mixing
    filters: dict[str, Any] | None = None  # overrides of corpus.filters for this source
    pii: dict[str, Any] | None = None  # overrides of corpus.pii for this source


@dataclass
class CorpusConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    on_bad_shard: Literal["fail", "skip"] = "fail"  # a shard that cannot be opened at all
    workers: int = 0  # processes for per-shard work; 0 = all cores
    max_record_bytes: int = 8 * 1024 * 1024  # longer lines/records are quarantined
    filters: QualityFilters = field(default_factory=QualityFilters)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    val_fraction: float = 0.01  # share of documents (by hash) held out for validation
    docs_per_output_shard: int = 50_000  # rows per Parquet file written


# --------------------------------------------------------------------------------------------
# Tokenizer, plan and model sections.


@dataclass
class TokenizerConfig:
    """SentencePiece training (`make tokenizer`)."""

    type: Literal["unigram", "bpe"] = "unigram"  # unigram as BloombergGPT
    vocab_size: int | Literal["auto"] = 8192  # a multiple of 64, or auto: chosen from candidates
    candidates: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    sample_docs: int = 200_000  # training documents sampled (deterministically) from train
    max_sample_chars: int = 200_000_000  # memory cap on the training sample
    eval_docs: int = 2000  # validation documents used for auto size and the report
    character_coverage: float = 0.9999
    byte_fallback: bool = True  # unknown characters become UTF-8 bytes, never <unk>
    split_digits: bool = True  # every digit its own piece
    # Pieces reserved for the chat template, never split.
    special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    threads: int = 0  # 0 = every core


@dataclass
class PlanConfig:
    """The compute budget and how to spend it (`make plan`): flops, gpu + hours, or minutes."""

    flops: float | None = None  # total training FLOPs
    gpu: str | None = None  # accelerator name (h100, a100, ...) with gpus, hours, mfu
    gpus: int = 1
    hours: float | None = None
    mfu: float = 0.4  # expected model FLOPs utilization
    minutes: float | None = None  # wall-clock on this machine (measured with a short probe)
    law: Literal["approach1", "approach3"] = "approach3"  # Chinchilla approach
    fit: Literal["chinchilla", "epoch"] = "chinchilla"  # approach 3 constants: paper or Epoch AI
    max_epochs: float = 4.0  # repeat the unique tokens at most this many times
    seq_len: int = 1024  # training context length
    global_batch_tokens: int | None = None  # tokens per optimizer step; null: from the plan
    require_tokens: bool = False  # a missing tokens folder is an error rather than a note


@dataclass
class ModelConfig:
    """The decoder's shape. With from_plan, `make pretrain` takes the shape from plan.json."""

    from_plan: bool = True
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4  # fewer than n_heads: grouped-query attention
    ffn_dim: int = 704  # SwiGLU hidden size
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class TrainConfig:
    """Pretraining with Lightning (`make pretrain`). Sizes left null come from plan.json."""

    precision: Literal["bf16-mixed", "32-true", "bf16-true", "16-mixed"] = "bf16-mixed"
    # plan: the plan's recommendation; auto: one device; ddp, fsdp, deepspeed (ZeRO zero_stage).
    strategy: Literal["plan", "auto", "ddp", "fsdp", "deepspeed"] = "plan"
    zero_stage: Literal[2, 3] = 2  # DeepSpeed ZeRO stage when strategy is deepspeed
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1  # per node
    num_nodes: int = 1
    tokens: int | None = None  # training tokens; null: the plan's
    micro_batch: int | None = None  # sequences per device per forward; null: the plan's
    grad_accum: int | None = None  # micro-batches per optimizer step; null: the plan's
    seq_len: int | None = None  # null: plan.seq_len
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup-stable-decay
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    warmup_steps: int | None = None  # null: 2% of the steps (at least 1)
    weight_decay: float = 0.1  # not applied to norms and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max gradient norm; null: no clipping
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool | None = None  # null: the plan's choice
    val_every: int = 200  # optimizer steps between validations
    val_batches: int | None = 50  # micro-batches per validation; null: the whole val split
    ckpt_every: int = 200  # optimizer steps between checkpoints
    log_every: int = 10  # optimizer steps between logged metrics
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model.safetensors
    sample_prompt: str = "The"  # `make pretrain` ends by continuing this prompt
    sample_tokens: int = 48


@dataclass
class Recipe:
    name: str = ""  # the run's name: outputs go to build/<name>/; default: the file's stem
    seed: int = 1234
    build_dir: str = "build"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # Filled by the loader, not by the YAML.
    path: Path | None = field(default=None, repr=False, compare=False, metadata={"loader": True})

    @property
    def run_dir(self) -> Path:
        return Path(self.build_dir) / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def source(self, name: str) -> SourceConfig:
        for s in self.corpus.sources:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Loading and validation.


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths ('corpus.sources[0].name') to 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


class _Ctx:
    def __init__(self, file: str, lines: dict[str, int]):
        self.file = file
        self.lines = lines

    def fail(self, key: str, message: str) -> RecipeError:
        # Report the nearest key that has a line (a missing key has none; its parent does).
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        where = f"{self.file}:{self.lines[probe]}" if probe else self.file
        return RecipeError(f"{where}: {key or '<top level>'}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, ctx)
            except RecipeError as e:
                errors.append(e)
        raise ctx.fail(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ctx.fail(key, f"must be {_type_name(tp)}, got {value!r}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ctx.fail(key, f"expected a mapping of settings, got {value!r}")
        return _build(tp, value, key, ctx)
    if origin is list:
        if not isinstance(value, list):
            raise ctx.fail(key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.fail(key, f"expected a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp)
        return {
            _convert(k, ktp, f"{key}.{k}", ctx): _convert(v, vtp, f"{key}.{k}", ctx)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(key, f"expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.fail(key, f"expected text, got {value!r}")
        return value
    raise ctx.fail(key, f"unsupported setting type {tp}")  # pragma: no cover - programming error


def _build(cls: type, data: dict, prefix: str, ctx: _Ctx) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("loader")]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            extra = f"did you mean {hint[0]!r}?" if hint else "valid keys: " + ", ".join(names)
            raise ctx.fail(key, f"unknown key; {extra}")
        kwargs[k] = _convert(v, hints[k], key, ctx)
    return cls(**kwargs)


def _overrides(cls: type, overrides: dict[str, Any], key: str, ctx: _Ctx) -> dict[str, Any]:
    """Per-source overrides are partial sections: validate and convert them like the section."""
    obj = _build(cls, overrides, key, ctx)
    return {k: getattr(obj, k) for k in overrides}


def _validate(recipe: Recipe, ctx: _Ctx) -> None:
    c = recipe.corpus
    if not c.sources:
        raise ctx.fail("corpus.sources", "at least one source is needed (see recipes/demo.yaml)")
    seen = set()
    for i, s in enumerate(c.sources):
        key = f"corpus.sources[{i}]"
        if not s.name:
            raise ctx.fail(key, "every source needs a `name`")
        if s.name in seen:
            raise ctx.fail(f"{key}.name", f"source name {s.name!r} is used twice")
        seen.add(s.name)
        if s.kind == "shards" and not s.path:
            raise ctx.fail(key, "a `shards` source needs `path` (a folder or a glob)")
        if s.weight is not None and s.weight < 0:
            raise ctx.fail(f"{key}.weight", "weights must be >= 0")
        if s.filters is not None:
            s.filters = _overrides(QualityFilters, s.filters, f"{key}.filters", ctx)
        if s.pii is not None:
            s.pii = _overrides(PIIConfig, s.pii, f"{key}.pii", ctx)
    weights = [s.weight for s in c.sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ctx.fail("corpus.sources", "give `weight` to every source or to none")
    if not 0 <= c.val_fraction < 1:
        raise ctx.fail("corpus.val_fraction", "must be in [0, 1)")
    d = c.dedup
    if not 0 < d.threshold <= 1:
        raise ctx.fail("corpus.dedup.threshold", "must be in (0, 1]")
    if d.shingle < 1 or d.num_perm < 16:
        raise ctx.fail("corpus.dedup", "shingle must be >= 1 and num_perm >= 16")
    t = recipe.tokenizer
    if t.vocab_size != "auto" and (t.vocab_size < 256 or t.vocab_size % 64):
        raise ctx.fail("tokenizer.vocab_size", "must be a multiple of 64 (>= 256), or auto")
    if any(v < 256 or v % 64 for v in t.candidates):
        raise ctx.fail("tokenizer.candidates", "every candidate must be a multiple of 64, >= 256")
    for i, f in enumerate(c.decontaminate.files):
        if not Path(f).exists():
            raise ctx.fail(f"corpus.decontaminate.files[{i}]", f"no such file: {f}")


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe; raises RecipeError with file:line and the fix."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: no such recipe file (recipes live in recipes/, e.g. demo.yaml)")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections (corpus:, ...), not {data!r}")
    ctx = _Ctx(str(p), _key_lines(text))
    recipe = _build(Recipe, data, "", ctx)
    recipe.path = p
    if not recipe.name:
        recipe.name = p.stem
    _validate(recipe, ctx)
    return recipe


def section_dict(obj: Any) -> Any:
    """A dataclass section as plain data (for fingerprints and manifests)."""
    return dataclasses.asdict(obj)


def merged(base: Any, overrides: dict[str, Any] | None) -> Any:
    """A copy of a dataclass section with a source's overrides applied."""
    return dataclasses.replace(base, **(overrides or {}))
