"""Reading `make tokens` output back: one split's tokens memory-mapped, with document offsets,
and the fixed-length windows over them that training and evaluation read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

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
        return cls(recipe.layout.tokens, split)

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


class TokenWindows(Dataset):
    """Window i is `tokens[i*seq_len : i*seq_len + seq_len + 1]` as (x, y), y = x shifted by one.

    Windows do not overlap except for the one boundary token, and they cross document
    boundaries (documents are separated by eos in the array): the usual GPT packing.
    """

    def __init__(self, arrays: TokenArrays, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, not {seq_len}")
        self.arrays, self.tokens, self.seq_len = arrays, arrays.tokens, seq_len
        self.n = max(arrays.num_tokens - 1, 0) // seq_len
        if self.n == 0:
            raise UserError(
                f"the {arrays.split} split of {arrays.directory} has {arrays.num_tokens} tokens, "
                f"fewer than one window of seq_len + 1 = {seq_len + 1}: set a shorter "
                "train.seq_len (or plan.seq_len) in the recipe, or add more data"
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} of {self.n}")
        a = i * self.seq_len
        w = torch.from_numpy(self.tokens[a : a + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]

    # A memmap pickles as a full in-memory copy; a worker started by spawn reopens the file.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["arrays"] = (state["arrays"].directory, state["arrays"].split)
        del state["tokens"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.arrays = TokenArrays(*state["arrays"])
        self.tokens = self.arrays.tokens
