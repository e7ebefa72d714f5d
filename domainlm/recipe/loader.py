"""The Recipe (every section) and its loading: YAML into dataclasses, validated with messages
that name the file, the line, the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from domainlm.errors import UserError
from domainlm.recipe.align import AlignConfig
from domainlm.recipe.checks import FieldError, Rule, check_section
from domainlm.recipe.corpus import (
    CorpusConfig,
    PIIConfig,
    QualityFilters,
    SourceConfig,
)
from domainlm.recipe.finetune import FinetuneConfig
from domainlm.recipe.layout import RunLayout
from domainlm.recipe.model import ModelConfig
from domainlm.recipe.stages import (
    MUON_UNSHARDED,
    EvalConfig,
    ExportConfig,
    PlanConfig,
    TokenizerConfig,
    TrainConfig,
    muon_strategy_error,
)
from domainlm.recipe.sweep import SweepConfig


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    # Filled by the loader, not by the YAML.
    path: Path | None = field(default=None, repr=False, compare=False, metadata={"loader": True})

    RANGES: ClassVar[dict[str, Rule | str]] = {"name": "name"}

    @property
    def layout(self) -> RunLayout:
        """Every output path of this run (build/<name>/...)."""
        return RunLayout(self.build_dir, self.name)

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
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields if not f.metadata.get("loader") and f.metadata.get("recipe", 1)]
    derived = [f.name for f in fields if f.metadata.get("recipe", 1) is False]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k in derived:
            raise ctx.fail(key, "is not a recipe setting: it comes from an earlier stage's output")
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            extra = f"did you mean {hint[0]!r}?" if hint else "valid keys: " + ", ".join(names)
            raise ctx.fail(key, f"unknown key; {extra}")
        kwargs[k] = _convert(v, hints[k], key, ctx)
    try:
        obj = cls(**kwargs)
        check_section(obj)
    except FieldError as e:
        key = f"{prefix}.{e.field}" if prefix else e.field
        raise ctx.fail(key, str(e)) from None
    except UserError as e:  # a section that checks itself as a whole (the model's shape)
        raise ctx.fail(prefix, str(e)) from None
    return obj


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
        if s.filters is not None:
            s.filters = _overrides(QualityFilters, s.filters, f"{key}.filters", ctx)
        if s.pii is not None:
            s.pii = _overrides(PIIConfig, s.pii, f"{key}.pii", ctx)
    weights = [s.weight for s in c.sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ctx.fail("corpus.sources", "give `weight` to every source or to none")
    t = recipe.tokenizer
    if t.vocab_size != "auto" and (t.vocab_size < 256 or t.vocab_size % 64):
        raise ctx.fail("tokenizer.vocab_size", "must be a multiple of 64 (>= 256), or auto")
    if any(v < 256 or v % 64 for v in t.candidates):
        raise ctx.fail("tokenizer.candidates", "every candidate must be a multiple of 64, >= 256")
    tr = recipe.train
    if tr.optimizer == "muon" and tr.strategy in MUON_UNSHARDED:
        raise ctx.fail("train.optimizer", muon_strategy_error(tr.strategy))
    for i, f in enumerate(c.decontaminate.files):
        if not Path(f).exists():
            raise ctx.fail(f"corpus.decontaminate.files[{i}]", f"no such file: {f}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as a recipe allows it: no key twice in a mapping (the second would silently win),
    no aliases (`*name`, which can make a few hundred bytes expand to gigabytes)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None,
                f"the alias *{event.anchor} is not allowed in a recipe: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"the key {key!r} appears twice in one mapping (first at line "
                    f"{seen[key].line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe; raises RecipeError with file:line and the fix."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: no such recipe file (recipes live in recipes/, e.g. demo.yaml)")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
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
