"""The built-in `python-docs` source: the running Python's standard library documentation."""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from domainlm.files import hash_json

# Bump when the documents this module produces change, so cached results are redone.
GENERATOR_VERSION = 1

# Parts of the standard library that are not documentation of its API: test suites, demos,
# vendored helpers, and packages made of generated tables.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "pydoc_data",
    "encodings",
    "__pycache__",
    "venv",
    "__phello__",
}


@dataclass(frozen=True)
class ApiEntry:
    """One documented function, class or method of the standard library."""

    module: str
    qualname: str
    kind: str  # "function" | "class" | "method"
    signature: str  # e.g. "(path, *, follow_symlinks=True)"
    doc: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def fingerprint() -> str:
    """Changes when the documents would: another Python, another stdlib or a new generator."""
    return hash_json([GENERATOR_VERSION, sys.version, str(stdlib_dir())])


def _module_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(("_test", "test_")) for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts):  # private modules
            continue
        out.append((".".join(parts), path))
    return sorted(out)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # noqa: BLE001 - an odd AST must not stop the whole source
        return "(...)"


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _entries(module: str, tree: ast.Module) -> Iterator[ApiEntry]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            doc = ast.get_docstring(node)
            if doc:
                yield ApiEntry(module, node.name, "function", _signature(node), doc)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            init = next(
                (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                None,
            )
            sig = _signature(init).replace("(self, ", "(").replace("(self)", "()") if init else ""
            doc = ast.get_docstring(node)
            if doc:
                yield ApiEntry(module, node.name, "class", sig, doc)
            for sub in node.body:
                if (
                    isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not sub.name.startswith("_")
                    and ast.get_docstring(sub)
                ):
                    yield ApiEntry(
                        module,
                        f"{node.name}.{sub.name}",
                        "method",
                        _signature(sub),
                        ast.get_docstring(sub) or "",
                    )


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def iter_modules(
    root: Path | None = None, part: int = 0, parts: int = 1
) -> Iterator[tuple[str, str | None, list[ApiEntry]]]:
    """(module name, module docstring, documented API) for every public stdlib module, sorted.

    The sources are parsed with `ast`, never imported: importing every module of the standard
    library has side effects (a browser opens for `antigravity`, `this` prints a poem).
    """
    for name, path in _module_files(root or stdlib_dir())[part::parts]:
        tree = _parse(path)
        if tree is None:
            continue
        yield name, ast.get_docstring(tree), list(_entries(name, tree))


def _entry_text(e: ApiEntry) -> str:
    head = f"class {e.module}.{e.qualname}{e.signature}" if e.kind == "class" else (
        f"{e.qualname}{e.signature}"
    )
    return f"{head}\n\n{e.doc}"


def _documents_of(name: str, doc: str | None, entries: list[ApiEntry]) -> Iterator[tuple[str, str]]:
    """A module's functions form one document; each class with its methods forms another."""
    functions = [e for e in entries if e.kind == "function"]
    if doc or functions:
        parts = [f"Module {name}"] + ([doc] if doc else []) + [_entry_text(e) for e in functions]
        yield f"module/{name}", "\n\n".join(parts)
    for cls in (e for e in entries if e.kind == "class"):
        methods = [e for e in entries if e.qualname.startswith(cls.qualname + ".")]
        parts = [_entry_text(cls)] + [_entry_text(m) for m in methods]
        yield f"class/{name}.{cls.qualname}", "\n\n".join(parts)


def iter_documents(
    root: Path | None = None, part: int = 0, parts: int = 1
) -> Iterator[tuple[str, str]]:
    """(name, text) documents: per module, per class and per pydoc topic, in a fixed order.

    `part` of `parts` yields every parts-th module and topic, so workers can share the
    parsing; the union of all parts is the whole source.
    """
    for name, doc, entries in iter_modules(root, part, parts):
        yield from _documents_of(name, doc, entries)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; modules still give a corpus
        topics = {}
    for key in sorted(topics)[part::parts]:
        text = topics[key].strip()
        if text:
            yield f"topic/{key}", text
