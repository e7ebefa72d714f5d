"""Writing the corpus stage's outputs: Parquet splits, rejected records and report.md."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from domainlm.corpus.assemble import Assembled
from domainlm.corpus.records import rejected_line
from domainlm.files import hash_file
from domainlm.recipe import Recipe

OUTPUT_COLUMNS = ["id", "text", "source", "origin", "license", "created", "meta"]
REJECT_ORDER = ["quarantine", "filter", "duplicate", "decontaminated"]


def _write_split(out: Path, name: str, table: pa.Table, rows: list[int], copy: list[int],
                 per_file: int) -> dict[str, Any]:
    files = {}
    n_files = max(1, -(-len(rows) // per_file))
    for k in range(n_files):
        lo, hi = k * per_file, min((k + 1) * per_file, len(rows))
        part = table.select(OUTPUT_COLUMNS).take(pa.array(rows[lo:hi], type=pa.int64()))
        part = part.append_column("copy", pa.array(copy[lo:hi], type=pa.int32()))
        path = out / f"{name}-{k:05d}.parquet"
        # Fixed writer settings and no timestamps: two builds give byte-identical files.
        pq.write_table(part, path, compression="zstd", row_group_size=10_000)
        files[path.name] = {"rows": part.num_rows, "hash": hash_file(path)}
    return files


def _write_rejected(path: Path, cat: str, shard_parts: list[Path | dict[str, Any]],
                    corpus_wide: list[dict[str, Any]]) -> int:
    """rejected/<cat>.jsonl: the shards' rows in canonical order (copied from their cache as
    they are, a block at a time), then the corpus-wide ones. Returns the number of rows."""
    rows = 0
    with open(path, "wb") as f:
        for part in shard_parts:
            if isinstance(part, dict):
                if part["reason"].split(":", 1)[0] == cat:
                    f.write(rejected_line(part).encode("utf-8"))
                    rows += 1
                continue
            src = part / f"rejected-{cat}.jsonl"
            if src.exists():
                with open(src, "rb") as g:
                    while block := g.read(1 << 20):
                        f.write(block)
                        rows += block.count(b"\n")
        for r in corpus_wide:
            f.write(rejected_line(r).encode("utf-8"))
            rows += 1
    return rows


def _is_output(name: str) -> bool:
    return name.endswith(".parquet") and name.startswith(("train-", "val-"))


def write_outputs(
    recipe: Recipe,
    out: Path,
    result: Assembled,
    shard_parts: list[Path | dict[str, Any]],
    stats: list[dict[str, Any]],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Write every output file of the stage (not the manifest); return their rows and hashes.

    The files are written into a staging folder first and moved into place only when all of
    them are complete, so a failure before that leaves the previous outputs as they were.
    `shard_parts` is, per shard in canonical order, its cache folder (holding its rejected
    rows) or the one rejected row of a shard refused as a whole.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "rejected").mkdir(parents=True)
    per_file = recipe.corpus.docs_per_output_shard
    outputs: dict[str, Any] = {}
    outputs.update(
        _write_split(
            staging, "train", result.table, [i for i, _ in result.train],
            [j for _, j in result.train], per_file,
        )
    )
    outputs.update(
        _write_split(staging, "val", result.table, result.val, [0] * len(result.val), per_file)
    )

    by_cat: dict[str, list[dict[str, Any]]] = {c: [] for c in REJECT_ORDER}
    for r in result.rejected:
        by_cat.setdefault(r["reason"].split(":", 1)[0], []).append(r)
    for cat, rows in by_cat.items():
        path = staging / "rejected" / f"{cat}.jsonl"
        n = _write_rejected(path, cat, shard_parts, rows)
        outputs[f"rejected/{cat}.jsonl"] = {"rows": n, "hash": hash_file(path)}

    report = render_report(recipe, result, stats, counts, outputs)
    (staging / "report.md").write_text(report, encoding="utf-8")
    outputs["report.md"] = {"hash": hash_file(staging / "report.md")}

    # Everything is complete: replace the previous outputs (a handful of renames).
    (out / "rejected").mkdir(exist_ok=True)
    stale = [p for p in out.iterdir() if _is_output(p.name)]
    stale += [p for p in (out / "rejected").glob("*.jsonl")]
    for name in outputs:
        os.replace(staging / name, out / name)
    for p in stale:
        if p.relative_to(out).as_posix() not in outputs:
            p.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return outputs


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(
    recipe: Recipe,
    result: Assembled,
    stats: list[dict[str, Any]],
    counts: dict[str, Any],
    outputs: dict[str, Any],
) -> str:
    """report.md: every number comes from this build's counts, nothing is typed in."""
    srcs = list(counts["sources"].items()) + [("**total**", counts["total"])]
    parts = [f"# Corpus report: {recipe.name}", ""]
    parts.append("## Records by outcome\n")
    parts.append(
        _table(
            ["source", "in", "kept", "filtered", "exact dup", "near dup", "decontaminated",
             "quarantined"],
            [
                [n, c["in"], c["kept"], sum(c["filtered"].values()), c["duplicates"]["exact"],
                 c["duplicates"]["near"], c["decontaminated"], c["quarantined"]]
                for n, c in srcs
            ],
        )
    )
    reasons: Counter[tuple[str, str]] = Counter()
    for st in stats:
        for r, n in {**st["quarantined"], **st["filtered"]}.items():
            reasons[(st["source"], r)] += n
    for r in result.rejected:
        reasons[(r["source"], r["reason"])] += 1
    parts.append("\n## Reasons\n")
    parts.append(
        _table(["source", "reason", "records"],
               [[s, r, n] for (s, r), n in sorted(reasons.items())] or [["-", "-", 0]])
    )

    chars_in: Counter[str] = Counter()
    chars_passed: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    for st in stats:
        chars_in[st["source"]] += st["chars_in"]
        chars_passed[st["source"]] += st["chars_passed"]
        langs.update(st["languages"])
        pii.update(st["pii"])
    parts.append("\n## Characters and mixing\n")
    parts.append(
        _table(
            ["source", "chars read", "chars after filters", "train docs", "train chars",
             "weight", "share before", "target share", "factor", "train rows after mix",
             "train chars after mix"],
            [
                [s, chars_in[s], chars_passed[s], m.docs, m.chars,
                 "-" if m.weight is None else m.weight, f"{m.share_before:.3f}",
                 f"{m.target_share:.3f}", f"{m.factor:.3f}", m.docs_after, m.chars_after]
                for s, m in result.mix.items()
            ],
        )
    )
    parts.append("\n## Languages (documents that reached language id)\n")
    parts.append(
        _table(["language", "documents"], [[k, v] for k, v in langs.most_common()] or
               [["-", 0]])
    )
    parts.append("\n## Personal data redacted\n")
    parts.append(_table(["kind", "replacements"], [[k, v] for k, v in sorted(pii.items())]
                        or [["-", 0]]))
    parts.append("\n## Largest duplicate clusters\n")
    if result.clusters:
        parts.append(
            _table(["kept document", "cluster size", "some duplicates"],
                   [[c["kept"], c["size"], ", ".join(c["duplicates"])] for c in result.clusters])
        )
    else:
        parts.append("No duplicates found.")
    parts.append("\n## Outputs\n")
    parts.append(
        _table(["file", "rows"], [[k, v.get("rows", "-")] for k, v in sorted(outputs.items())])
    )
    bad = [st["rel"] for st in stats if st.get("unreadable")]
    empty = [st["rel"] for st in stats if st.get("in") == 0]
    if bad or empty:
        parts.append("\n## Shards that gave nothing\n")
        parts += [f"- unreadable: `{b}` (see rejected/quarantine.jsonl)" for b in bad]
        parts += [f"- empty: `{e}`" for e in empty]
    return "\n".join(parts) + "\n"
