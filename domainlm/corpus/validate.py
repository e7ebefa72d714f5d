"""`corpus validate` and `corpus add`: check shards before they are contributed, then copy them."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click

from domainlm.corpus.readers import SUPPORTED_SUFFIXES, ShardError, read_shard, shard_format
from domainlm.corpus.records import Doc
from domainlm.corpus.scan import scan
from domainlm.errors import UserError
from domainlm.files import atomic_path, hash_file

# Problems printed per file; a broken export can have millions, and the counts by kind in the
# summary say the rest.
MAX_SHOWN = 1000

_TEAM_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024  # as the recipe's corpus.max_record_bytes


@dataclass
class ShardReport:
    """What validation found in one file (or one path argument that names no usable file)."""

    path: Path
    display: str
    size: int = 0
    ok: int = 0
    problems: int = 0
    duplicates: int = 0
    kinds: Counter = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)  # "<file>:<line>: <kind>: <detail>"
    unusable: bool = False  # a ShardError or a path that is not a shard: cannot be copied
    ignored: str | None = None  # a file in a folder that `corpus build` skips, and why

    def problem(self, origin: str, kind: str, detail: str) -> None:
        self.problems += 1
        self._note(origin, kind, detail)

    def duplicate(self, origin: str, first: str) -> None:
        self.duplicates += 1
        detail = f"same text as {first} (warning: `corpus build` keeps only the first)"
        self._note(origin, "duplicate_text", detail)

    def _note(self, origin: str, kind: str, detail: str) -> None:
        self.kinds[kind] += 1
        if len(self.lines) < MAX_SHOWN:
            self.lines.append(f"{origin}: {kind}: {detail}")

    def summary(self) -> str:
        if self.ignored:
            return f"{self.display}: ignored (warning): {self.ignored}"
        if self.unusable and not self.ok:
            return f"{self.display}: unusable ({_plural(self.problems, 'problem')})"
        parts = [
            f"{_plural(self.ok, 'record')} ok",
            _plural(self.problems, "problem"),
            _plural(self.duplicates, "exact duplicate"),
            _human_bytes(self.size),
        ]
        return f"{self.display}: " + ", ".join(parts)


def check_shard(path: Path, max_record_bytes: int, display: str | None = None) -> ShardReport:
    """Read one shard the way `corpus build` does and collect everything wrong with it."""
    display = display or str(path)
    report = ShardReport(path=path, display=display)
    try:
        report.size = path.stat().st_size
    except OSError:
        pass
    seen_text: dict[bytes, str] = {}
    seen_id: dict[str, str] = {}
    try:
        for item in read_shard(path, "validate", display, max_record_bytes):
            if not isinstance(item, Doc):
                report.problem(item.origin, item.reason.split(":", 1)[-1], item.detail)
                continue
            report.ok += 1
            # A 16-byte digest per record keeps memory small on large shards.
            key = hashlib.blake2b(
                item.text.strip().encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()
            first = seen_text.setdefault(key, item.origin)
            if first != item.origin:
                report.duplicate(item.origin, first)
            if item.id != item.origin:
                first = seen_id.setdefault(item.id, item.origin)
                if first != item.origin:
                    detail = f"id {item.id!r} is also used at {first}; ids must be unique"
                    report.problem(item.origin, "duplicate_id", detail)
    except ShardError as e:
        report.unusable = True
        report.problem(f"{display}:0", "bad_shard", e.problem)
    if report.ok == 0 and report.problems == 0:
        detail = "the file has no records (it is empty or only blank lines); don't contribute it"
        report.problem(f"{display}:0", "empty", detail)
    return report


def run_validate(paths: list[Path], max_record_bytes: int) -> int:
    """Check files and folders of shards, print a report; 0 when all is clean, else 1."""
    if max_record_bytes < 1:
        raise UserError(f"--max-record-bytes must be at least 1, got {max_record_bytes}")
    reports = _check_paths(paths, max_record_bytes)
    _print_reports(reports)
    reports = [r for r in reports if not r.ignored]
    problems = sum(r.problems for r in reports)
    bad_files = sum(1 for r in reports if r.problems)
    if problems:
        click.echo(
            f"{_plural(problems, 'problem')} in {_plural(bad_files, 'file')} of {len(reports)}: "
            "fix them (each is listed as file:line above) and validate again"
        )
        return 1
    records = sum(r.ok for r in reports)
    click.echo(f"all clean: {_plural(len(reports), 'file')}, {_plural(records, 'record')}")
    return 0


def run_add(team: str, files: list[Path], shards_dir: Path, force: bool) -> int:
    """Validate shard files and copy them into shards_dir/<team>/; 0 on success, else 1."""
    if not _TEAM_NAME.fullmatch(team):
        raise UserError(
            f"team name {team!r}: use only letters, digits, '-' and '_' "
            f"(it becomes the folder {shards_dir}/<team>/)"
        )
    reports = []
    for f in files:
        if f.is_dir():
            r = ShardReport(path=f, display=str(f), unusable=True)
            detail = f"is a folder; `corpus add` takes shard files, e.g. {f}/*.jsonl"
            r.problem(f"{f}:0", "not_a_file", detail)
            reports.append(r)
        else:
            reports.extend(_check_paths([f], max_record_bytes=_DEFAULT_MAX_RECORD_BYTES))
    names: dict[str, Path] = {}
    for r in reports:
        first = names.setdefault(r.path.name, r.path)
        if first != r.path:
            detail = f"has the same file name as {first}; rename one of them"
            r.problem(f"{r.display}:0", "name_clash", detail)
            r.unusable = True
    _print_reports(reports)

    problems = sum(r.problems for r in reports)
    if any(r.unusable for r in reports):
        click.echo("nothing copied: some files cannot be used at all (see above)")
        return 1
    if problems and not force:
        click.echo(
            f"nothing copied: {_plural(problems, 'problem')} found; fix them, "
            "or copy anyway with --force (bad records are then quarantined by `corpus build`)"
        )
        return 1
    if problems:
        click.echo(f"copying despite {_plural(problems, 'problem')} (--force)")

    dest_dir = shards_dir / team
    plan: list[tuple[Path, Path]] = []
    conflicts = 0
    for r in reports:
        dest = dest_dir / r.path.name
        if not dest.exists():
            plan.append((r.path, dest))
        elif _same_content(r.path, dest):
            click.echo(f"already there: {dest} (same content)")
        else:
            conflicts += 1
            click.echo(
                f"refusing to overwrite {dest}: it exists with different content; give the new "
                "shard a new name (e.g. add a date), or remove the old one first if it replaces it"
            )
    if conflicts:
        click.echo("nothing copied")
        return 1
    for src, dest in plan:
        _copy(src, dest)
        click.echo(f"copied {src} -> {dest} ({_human_bytes(dest.stat().st_size)})")
    if plan:
        click.echo("next: `make corpus` processes the new shards (the others come from the cache)")
    return 0


def _check_paths(paths: list[Path], max_record_bytes: int) -> list[ShardReport]:
    reports: list[ShardReport] = []
    done: set[Path] = set()
    for p in paths:
        try:
            found = scan(p)
        except ShardError as e:
            r = ShardReport(path=p, display=str(p), unusable=True)
            r.problem(f"{p}:0", "bad_shard", e.problem)
            reports.append(r)
            continue
        shards = found.files
        if p.is_dir():
            reports.extend(_ignored_files(p))
        for path, problem in found.refused:  # as `corpus build` refuses them
            r = ShardReport(path=path, display=str(path), unusable=True)
            r.problem(f"{path}:0", "refused", problem)
            reports.append(r)
        if not shards and not found.refused:
            r = ShardReport(path=p, display=str(p), unusable=True)
            supported = ", ".join(SUPPORTED_SUFFIXES)
            r.problem(f"{p}:0", "no_shards", f"no shard files found here (looked for {supported})")
            reports.append(r)
        for shard in shards:
            key = shard.resolve()
            if key not in done:
                done.add(key)
                reports.append(check_shard(shard, max_record_bytes))
    return reports


def _ignored_files(folder: Path) -> list[ShardReport]:
    # `corpus build` skips these; saying so here keeps a mis-named export from vanishing.
    supported = ", ".join(SUPPORTED_SUFFIXES)
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and shard_format(name) is None:
                path = Path(root, name)
                reason = f"not a shard file (shards are {supported}), `corpus build` skips it"
                out.append(ShardReport(path=path, display=str(path), ignored=reason))
    return out


def _print_reports(reports: list[ShardReport]) -> None:
    for r in reports:
        click.echo(r.summary())
        for line in r.lines:
            click.echo(line)
        hidden = r.problems + r.duplicates - len(r.lines)
        if hidden > 0:
            kinds = ", ".join(f"{k} x{n:,}" for k, n in r.kinds.most_common())
            click.echo(f"{r.display}: ... and {hidden:,} more not shown (all: {kinds})")


def _same_content(a: Path, b: Path) -> bool:
    try:
        if a.samefile(b):
            return True
    except OSError:
        pass
    return a.stat().st_size == b.stat().st_size and hash_file(a) == hash_file(b)


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        # The temporary file is private (0600); a shared shards folder needs the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} bytes"  # pragma: no cover - the loop always returns
