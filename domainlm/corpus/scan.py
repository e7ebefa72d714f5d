"""Finding a source's shards without reading outside its folder, and counting the records of a
file that is refused as a whole."""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from domainlm.corpus.jsonlines import SNIFF_BYTES, ShardError
from domainlm.corpus.readers import SUPPORTED_SUFFIXES, shard_format, unsupported


@dataclass
class Scan:
    """The shard files of a source, and what was found but refused, with why."""

    root: Path  # the declared folder (a glob's fixed prefix, a file's folder)
    files: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def source_root(spec: str | Path) -> Path:
    """The folder a source declares: the path itself, or a glob's fixed prefix."""
    p = Path(spec)
    fixed = []
    for part in p.parts:
        if is_glob(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return root.parent if root.is_file() else root


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def scan(spec: str | Path) -> Scan:
    """The shard files named by a file, a folder (searched recursively) or a glob, sorted.

    Hidden files and folders (names starting with '.') and unsupported suffixes are left out.
    Nothing outside the declared folder is read: a link that leads out of it (to a file or a
    folder) is refused, as are broken links and folders that cannot be listed. A named file
    with an unsupported suffix, or a path that does not exist and is not a glob, raises
    ShardError. A glob that matches nothing gives no files (the caller decides).
    """
    text = str(spec)
    path = Path(spec)
    root = source_root(spec)
    out = Scan(root)
    if path.is_file():
        if shard_format(path) is None:
            raise ShardError(path, unsupported(path))
        out.files = [path]  # a file named by the recipe is declared itself
        return out
    root_real = os.path.realpath(root)
    if path.is_dir():
        found = set(_walk(path, root_real, out))
    elif is_glob(text):
        found = set()
        for match in glob.glob(text, recursive=True):
            m = Path(match)
            if not _inside(match, root_real):
                out.refused.append((m, _outside(m, root)))
            elif m.is_dir():
                found.update(_walk(m, root_real, out))
            elif m.is_file() and shard_format(m) and not m.name.startswith("."):
                found.add(m)
    else:
        raise ShardError(path, "no such file or folder; give a shard file, a folder or a glob")
    out.files = sorted(found)
    out.refused = sorted(set(out.refused))
    return out


def _outside(path: Path, root: Path) -> str:
    return (
        f"is a link to {os.path.realpath(path)}, outside the source's folder {root}; nothing "
        "outside it is read: copy the data into the folder instead of linking to it"
    )


def _walk(folder: Path, root_real: str, out: Scan) -> Iterator[Path]:
    # Links inside the folder are followed; `seen` stops cycles.
    seen: set[str] = set()

    def unreadable(e: OSError) -> None:
        where = Path(e.filename) if e.filename else folder
        out.refused.append((where, f"cannot list the folder ({e.strerror}); check its "
                                   "permissions (a folder that cannot be read is not skipped)"))

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirs):
            p = Path(root, d)
            if d.startswith("."):
                continue
            if not _inside(str(p), root_real):
                out.refused.append((p, _outside(p, Path(folder))))
                continue
            keep.append(d)
        dirs[:] = keep
        for name in files:
            if name.startswith(".") or not shard_format(name):
                continue
            p = Path(root, name)
            if p.is_symlink() and not p.exists():
                out.refused.append((p, f"is a broken link (to {os.readlink(p)})"))
            elif not _inside(str(p), root_real):
                out.refused.append((p, _outside(p, Path(folder))))
            elif p.is_file():
                yield p


def find_shards(spec: str | Path) -> list[Path]:
    """The shard files of `spec` (see `scan`); refused entries are left out."""
    return scan(spec).files


# --------------------------------------------------------------------------------------------
# Counting the records of a file refused as a whole.

_CHUNK = 1 << 20


def count_records(path: Path) -> int | None:
    """How many records a refused file holds, when that can be told without trusting it: the
    non-blank lines of UTF-16/32 text or of JSONL that is compressed under a plain name, the
    rows of a Parquet file; None when it cannot be counted (binary, unreadable, damaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return None
    try:
        if head.startswith(b"PAR1") or shard_format(path) == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
            return _count_text(open(path, "rb"), "utf-32")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            return _count_text(open(path, "rb"), "utf-16")
        if head.startswith(b"\x1f\x8b"):
            return _count_text(gzip.open(path, "rb"), "utf-8")
        if head.startswith(b"\x28\xb5\x2f\xfd"):
            import zstandard

            raw = open(path, "rb")
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            return _count_text(reader, "utf-8", closing=raw)
        if b"\x00" in head:  # UTF-16 without a byte order mark, as the readers tell it
            even, odd = head[0::2], head[1::2]
            if odd and odd.count(0) > len(odd) // 3:
                return _count_text(open(path, "rb"), "utf-16-le")
            if even and even.count(0) > len(even) // 3:
                return _count_text(open(path, "rb"), "utf-16-be")
    except Exception:  # noqa: BLE001 - a damaged file: its records cannot be counted
        return None
    return None


def _count_text(stream: io.RawIOBase | io.BufferedIOBase, encoding: str, closing=None) -> int:
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    count = 0
    pending = ""  # the unfinished last line
    with stream:
        while chunk := stream.read(_CHUNK):
            lines = (pending + decoder.decode(chunk)).split("\n")
            # Only whether the unfinished line holds anything matters: a file that is one
            # enormous line is not kept in memory.
            pending = "x" if lines.pop().strip() else ""
            count += sum(1 for line in lines if line.strip())
        pending += decoder.decode(b"", final=True)
    if closing is not None:
        closing.close()
    return count + (1 if pending.strip() else 0)


__all__ = ["SUPPORTED_SUFFIXES", "Scan", "count_records", "find_shards", "scan", "source_root"]
