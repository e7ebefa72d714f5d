"""Near-duplicate search as partitioned work: each (band, hash slice) partition groups its band
hashes and verifies its candidate pairs on its own; union-find joins the verified pairs.

The per-shard work (shardwork.py) leaves, for every shard, one file of band hashes per band
and the documents' shingle hash sets. A partition task reads only its band's file of each
shard, keeps the hashes of its slice, sorts them, pairs documents that share a hash, and
verifies each pair with the exact Jaccard of their shingle sets (memory-mapped, so only the
candidates' sets are read). Its memory is bounded by the partition size, which the number of
slices keeps under PARTITION_DOCS whatever the corpus size; the same task runs in this
process, a process pool or on Ray. The verified pairs are few (they are the duplicates), so
the corpus-wide join that follows is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Band entries per partition: 16 bytes each (hash and document number), plus the sort.
PARTITION_DOCS = 4_000_000
# A bucket of more documents than this (boilerplate shared by thousands) pairs each member
# with its first BUCKET_PAIRS members only, so one bucket cannot make a quadratic number of
# pairs. The first members are the earliest documents, which the greedy pass keeps.
BUCKET_PAIRS = 64


@dataclass(frozen=True)
class ShardDedupFiles:
    """Where one shard's dedup files are, and the global number of its first document."""

    folder: str
    first: int  # global number (canonical order) of the shard's first document
    count: int


@dataclass(frozen=True)
class Partition:
    band: int
    part: int
    parts: int
    threshold: float
    shards: tuple[ShardDedupFiles, ...]
    # A file of one byte per document, 0 for exact duplicates (they take no part: a cluster
    # of copies would otherwise be verified pair by pair in every band); None: all take part.
    alive: str | None = None


def band_file(folder: Path, band: int) -> Path:
    return Path(folder) / f"band-{band:03d}.u64"


def partitions(
    shards: list[ShardDedupFiles], bands: int, threshold: float, parts: int | None = None,
    alive: str | None = None,
) -> list[Partition]:
    """Every partition task of a corpus: `bands` x the slices that keep each one small.

    The result does not depend on the number of slices (equal hashes share a slice), only
    the memory of each task does.
    """
    total = sum(s.count for s in shards)
    parts = parts or max(1, math.ceil(total / PARTITION_DOCS))
    return [
        Partition(b, p, parts, threshold, tuple(shards), alive)
        for b in range(bands) for p in range(parts)
    ]


class SetStore:
    """Shingle sets of documents by global number, memory-mapped from the shard caches; the
    sets of recent candidates are kept (a document is paired in every bucket it shares)."""

    CACHED = 20_000

    def __init__(self, shards: tuple[ShardDedupFiles, ...]):
        self.shards = shards
        self.firsts = np.array([s.first for s in shards], dtype=np.int64)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sets: dict[int, np.ndarray] = {}

    def get(self, doc: int) -> np.ndarray:
        """The document's shingle hashes, sorted and distinct."""
        s = self._sets.get(doc)
        if s is None:
            if len(self._sets) >= self.CACHED:
                self._sets.clear()
            s = self._sets[doc] = np.unique(self._raw(doc))
        return s

    def _raw(self, doc: int) -> np.ndarray:
        k = int(np.searchsorted(self.firsts, doc, side="right")) - 1
        if k not in self._open:
            folder = Path(self.shards[k].folder)
            values = np.memmap(folder / "sets.u32", dtype=np.uint32, mode="r") \
                if (folder / "sets.u32").stat().st_size else np.empty(0, np.uint32)
            offsets = np.fromfile(folder / "sets-offsets.i64", dtype=np.int64)
            self._open[k] = (values, offsets)
        values, offsets = self._open[k]
        row = doc - self.shards[k].first
        return np.asarray(values[offsets[row] : offsets[row + 1]])


def run_partition(task: Partition) -> np.ndarray:
    """The verified pairs of one partition: rows (earlier, later, Jaccard x 1e6), int64."""
    hashes, docs = [], []
    alive = np.memmap(task.alive, dtype=np.uint8, mode="r") if task.alive else None
    for s in task.shards:
        if s.count == 0:
            continue
        h = np.fromfile(band_file(Path(s.folder), task.band), dtype=np.uint64)
        mask = np.ones(s.count, dtype=bool)
        if task.parts > 1:
            mask &= (h % np.uint64(task.parts)) == np.uint64(task.part)
        if alive is not None:
            mask &= np.asarray(alive[s.first : s.first + s.count], dtype=bool)
        keep = np.flatnonzero(mask)
        hashes.append(h[keep])
        docs.append(keep.astype(np.int64) + s.first)
    if not hashes:
        return np.empty((0, 3), dtype=np.int64)
    h = np.concatenate(hashes)
    d = np.concatenate(docs)
    order = np.lexsort((d, h))
    h, d = h[order], d[order]
    same = h[1:] == h[:-1]
    if not same.any():
        return np.empty((0, 3), dtype=np.int64)
    # Runs of equal hashes: each is one bucket of candidates, in document order.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
    store = SetStore(task.shards)
    found: list[tuple[int, int, int]] = []
    for start, stop in zip(edges[0::2], edges[1::2] + 1, strict=True):
        members = d[start:stop].tolist()
        for j in range(1, len(members)):
            for i in range(min(j, BUCKET_PAIRS)):
                a, b = members[i], members[j]
                sa, sb = store.get(a), store.get(b)
                inter = np.intersect1d(sa, sb, assume_unique=True).size
                sim = inter / (sa.size + sb.size - inter)
                if sim >= task.threshold:
                    found.append((a, b, round(sim * 1e6)))
    if not found:
        return np.empty((0, 3), dtype=np.int64)
    return np.unique(np.array(found, dtype=np.int64), axis=0)


def write_dedup_files(folder: Path, sets: list[np.ndarray], bands: np.ndarray) -> None:
    """One shard's dedup files at once (the per-shard work appends them batch by batch):
    sets.u32 (the sets one after another), sets-offsets.i64, band-NNN.u64 (one per band)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.concatenate(sets or [np.empty(0, np.uint32)]).astype(np.uint32).tofile(folder / "sets.u32")
    sizes = np.array([s.size for s in sets], dtype=np.int64)
    np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tofile(folder / "sets-offsets.i64")
    for b in range(bands.shape[0]):
        bands[b].astype(np.uint64).tofile(band_file(folder, b))


def dedup_texts(
    texts: list[str], folder: Path, threshold: float, *, shingle: int = 5, num_perm: int = 128,
    seed: int = 1, shards: int = 1, parts: int | None = None,
) -> list[NearDup]:
    """Near duplicates among `texts` (in order) through the same files and partition tasks as
    `make corpus`, in this process: for tests and the benchmark."""
    from domainlm.corpus.dedup import MinHasher, band_hashes, lsh_bands, shingle_set

    sets = [shingle_set(t, shingle) for t in texts]
    sigs = MinHasher(num_perm, seed).sign(sets)
    n_bands, rows = lsh_bands(threshold, num_perm)
    cuts = np.linspace(0, len(texts), shards + 1).astype(int)
    files = []
    for k in range(shards):
        lo, hi = int(cuts[k]), int(cuts[k + 1])
        sub = Path(folder) / f"shard-{k}"
        write_dedup_files(sub, sets[lo:hi], band_hashes(sigs[lo:hi], n_bands, rows))
        files.append(ShardDedupFiles(str(sub), lo, hi - lo))
    tasks = partitions(files, n_bands, threshold, parts)
    found = [run_partition(t) for t in tasks]
    pairs = np.concatenate(found) if found else np.empty((0, 3), dtype=np.int64)
    return resolve(pairs, np.ones(len(texts), dtype=bool))


class UnionFind:
    """Disjoint sets over document numbers (only those that appear in a pair)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = parent.setdefault(x, x)
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class NearDup:
    doc: int  # the document dropped
    duplicate_of: int  # the earlier document kept that it matches (the earliest such)
    similarity: float  # exact Jaccard of their shingle sets


def resolve(pairs: np.ndarray, alive: np.ndarray) -> list[NearDup]:
    """Which documents to drop, given the verified pairs of every partition.

    Union-find joins the pairs into clusters; within a cluster the documents are visited in
    canonical order and one is dropped when it matches a document already kept (the earliest
    one it matches is named), as a greedy pass over the whole corpus would decide: every
    dropped document is verified against the one it names. Documents not `alive` (exact
    duplicates) take no part. Returned in document order.
    """
    if pairs.size == 0:
        return []
    pairs = np.unique(pairs, axis=0)
    uf = UnionFind()
    earlier: dict[int, list[tuple[int, int]]] = {}
    for a, b, sim in pairs.tolist():
        if alive[a] and alive[b]:
            uf.union(a, b)
            earlier.setdefault(b, []).append((a, sim))
    clusters: dict[int, list[int]] = {}
    for doc in uf.parent:
        clusters.setdefault(uf.find(doc), []).append(doc)
    out: list[NearDup] = []
    for members in clusters.values():
        kept: set[int] = set()
        for doc in sorted(members):
            matches = sorted(m for m in earlier.get(doc, ()) if m[0] in kept)
            if matches:
                first, sim = matches[0]
                out.append(NearDup(doc, first, sim / 1e6))
            else:
                kept.add(doc)
    out.sort(key=lambda n: n.doc)
    return out
