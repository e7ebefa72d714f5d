"""Reading `make tokens` output back: one split's tokens memory-mapped, with document offsets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.recipe import Recipe


class TokenArrays:
    """One split of build/<run>/tokens/: `tokens` (read-only memmap) and `offsets`.

    Document i is `tokens[offsets[i]:offsets[i + 1]]`; its last token is `eos_id`, so a
    window that crosses `offsets` sees documents separated by eos. `offsets` has num_docs + 1
    entries, the last equal to `num_tokens`.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        manifest = self.directory / "manifest.json"
        if not manifest.exists():
            # Without the manifest the stage did not finish; its arrays may be stale.
            raise UserError(f"{manifest} is missing: run `make tokens` first")
        self.meta: dict[str, Any] = read_json(self.directory / "meta.json")
        if split not in self.meta:
            raise UserError(f"{self.directory}/meta.json has no split {split!r}")
        counts = self.meta[split]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        path = self.directory / counts["file"]
        expected = counts["tokens"] * self.dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise UserError(
                f"{path} does not hold the {counts['tokens']} tokens meta.json counts: "
                "run `make tokens --force`"
            )
        # numpy cannot map an empty file; an empty split (no validation set) is an empty array.
        if counts["tokens"]:
            self.tokens: np.ndarray = np.memmap(path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)
        self.offsets: np.ndarray = np.load(self.directory / counts["index"], mmap_mode="r")
        if len(self.offsets) != counts["docs"] + 1 or int(self.offsets[-1]) != counts["tokens"]:
            raise UserError(f"{self.directory / counts['index']} does not match meta.json")

    @classmethod
    def from_recipe(cls, recipe: Recipe, split: str = "train") -> TokenArrays:
        return cls(recipe.stage_dir("tokens"), split)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def unique_tokens(self) -> int:
        """Tokens of original documents only (up-sampled repeats not counted)."""
        return int(self.meta[self.split]["unique_tokens"])

    def __len__(self) -> int:
        return self.num_docs

    def document(self, i: int, eos: bool = False) -> np.ndarray:
        """Document i's tokens, without its trailing eos unless `eos`."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a : b if eos else b - 1]

    def documents(self) -> Iterator[np.ndarray]:
        for i in range(self.num_docs):
            yield self.document(i)

    def __repr__(self) -> str:
        return (
            f"TokenArrays({str(self.directory)!r}, {self.split!r}: {self.num_tokens} tokens, "
            f"{self.num_docs} docs, {self.dtype.name})"
        )
