"""The stage runner: what every stage does around its own work. A stage declares its input
files and parameters; the runner fingerprints their content, answers "up to date", removes the
stale manifest, runs the work and writes the manifest (inputs with content hashes, parameters,
counts, timings, package versions) atomically, last."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from domainlm.errors import UserError
from domainlm.files import HashCache, hash_json, read_json, versions, write_json

Say = Callable[[str], None]


@dataclass
class Stage:
    """One stage of a run, as the runner sees it.

    inputs: label -> a file the stage reads (hashed by content) or a precomputed content
    fingerprint (a string: e.g. the Python standard library's, for the built-in source).
    params: every setting that changes the outputs (JSON-able). version: bump when the stage's
    code changes its outputs for the same inputs. outputs: files that must exist for the stage
    to be up to date (besides the manifest).
    """

    name: str
    manifest: Path
    inputs: dict[str, Path | str]
    params: Any
    version: int
    outputs: list[Path] = field(default_factory=list)
    hashes: Path | None = None  # where content hashes are cached (by size, times and inode)

    def input_hashes(self) -> dict[str, str]:
        cache = HashCache(self.hashes) if self.hashes else None
        out = {}
        for label, item in sorted(self.inputs.items()):
            if isinstance(item, str):
                out[label] = item
                continue
            if not item.is_file():
                raise UserError(f"{self.name}: input {item} is missing")
            out[label] = cache.get(item) if cache else HashCache.digest(item)
        if cache:
            cache.save()
        return out

    def fingerprint(self, hashes: dict[str, str]) -> str:
        return hash_json([self.name, self.version, hashes, self.params])


def file_inputs(files: Iterable[Path], root: Path) -> dict[str, Path]:
    """Input labels for files: their paths relative to `root` (the run folder)."""
    return {Path(f).relative_to(root).as_posix(): Path(f) for f in files}


def read_manifest(path: Path) -> dict | None:
    """A stage's manifest, or None when it is missing or unreadable (the stage is not built)."""
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def run_stage(
    stage: Stage,
    work: Callable[[str], dict[str, Any] | None],
    *,
    force: bool = False,
    say: Say = click.echo,
) -> dict[str, Any]:
    """Run `work(fingerprint)` unless the stage is up to date; returns the manifest (the old
    one when up to date). `work` returns the stage's own entries (counts, metrics, outputs,
    ...); the runner adds stage, version, fingerprint, inputs, parameters, seconds and
    versions. A `work` that returns None writes no manifest (a distributed run's other
    ranks)."""
    hashes = stage.input_hashes()
    fingerprint = stage.fingerprint(hashes)
    old = read_manifest(stage.manifest)
    built = all(p.exists() for p in stage.outputs)
    if not force and old is not None and old.get("fingerprint") == fingerprint and built:
        say(f"{stage.name}: up to date ({stage.manifest}); nothing to do")
        return old
    # Until the new manifest is written the stage is incomplete: a later stage must not trust
    # what an interrupted run leaves behind.
    stage.manifest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = work(fingerprint)
    if result is None:
        return {}
    manifest = {
        "stage": stage.name,
        "version": stage.version,
        "fingerprint": fingerprint,
        "inputs": {label: {"hash": h} | _where(stage.inputs[label]) for label, h in hashes.items()},
        "parameters": stage.params,
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
        "versions": versions(),
    }
    write_json(stage.manifest, manifest)
    return manifest


def _where(item: Path | str) -> dict[str, str]:
    return {} if isinstance(item, str) else {"path": str(item)}
