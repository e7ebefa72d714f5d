"""Continuous batching for the server: one thread owns the model and advances every running
sequence together, one decoding step at a time; new requests join between steps (after their
own prefill) and finished or abandoned ones leave, so concurrent clients share each forward
pass instead of waiting for each other."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from domainlm.model.batch import BatchDecoder, Sequence, Token

_END = object()  # a sequence's queue: no more tokens
MAX_BATCH = 64  # rows decoded together; further requests wait for a row to finish


@dataclass
class Stats:
    """What /metrics reports about the batch (read without a lock: counters of one writer)."""

    waiting: int = 0  # sequences submitted and not yet prefilled
    running: int = 0  # sequences in the batch
    steps: int = 0  # decoding steps run (every row advances one token per step)
    rows: int = 0  # rows summed over those steps (rows / steps: the mean batch size)
    prefills: int = 0  # prompts prefilled (the n choices of a request share one)


class Scheduler:
    """Decodes submitted sequences in a background thread, in one batch whatever their
    adapters (mix_adapters, the default: each LoRA applies to its own rows), or in one batch
    per adapter, stepped in turn. A sequence without a KV cache decodes in a batch of its own.
    """

    def __init__(self, model: nn.Module, max_batch: int = MAX_BATCH,
                 mix_adapters: bool = True) -> None:
        self.model, self.max_batch, self.mix_adapters = model, max_batch, mix_adapters
        self.stats = Stats()
        self._pending: deque[list[Sequence]] = deque()
        self._control: deque[Callable[[], bool]] = deque()
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._decoders: dict[object, BatchDecoder] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the callers' side

    @contextlib.contextmanager
    def together(self) -> Iterator[Callable[[Sequence], Iterator[Token]]]:
        """A source for TextStream whose sequences are submitted together when the block ends:
        sequences with the same prompt and adapter (a request's n choices) share one prefill,
        and all of them join the same step."""
        collected: list[Sequence] = []

        def source(seq: Sequence) -> Iterator[Token]:
            collected.append(seq)
            return self._tokens(seq)

        try:
            yield source
        except BaseException:
            for seq in collected:  # a request refused half-way runs nothing
                seq.cancelled.set()
                self._queues.pop(id(seq), None)
            raise
        groups: dict[tuple, list[Sequence]] = {}
        for seq in collected:
            key = (tuple(seq.prompt), seq.adapter, seq.params.use_cache)
            groups.setdefault(key, []).append(seq)
        self._submit(list(groups.values()))

    def source(self, seq: Sequence) -> Iterator[Token]:
        """A TextStream source for one sequence, submitted at once."""
        tokens = self._tokens(seq)
        self._submit([[seq]])
        return tokens

    def call(self, fn: Callable[[], bool]) -> None:
        """Run fn in the decoding thread between two steps (nothing else touches the model
        then); it runs again at later steps for as long as it returns False."""
        with self._wake:
            self._control.append(fn)
            self._start()
            self._wake.notify()

    def _tokens(self, seq: Sequence) -> Iterator[Token]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._queues[id(seq)] = q

        def tokens() -> Iterator[Token]:
            try:
                while True:
                    item = q.get()
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                seq.cancelled.set()  # a reader that stops early frees its row

        return tokens()

    def _submit(self, groups: list[list[Sequence]]) -> None:
        if not groups:
            return
        with self._wake:
            self._pending.extend(groups)
            self.stats.waiting += sum(len(g) for g in groups)
            self._start()
            self._wake.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="domainlm-decode",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the decoding thread

    def _deliver(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            q = self._queues.get(id(seq))
            if q is None:
                continue
            q.put(seq.tokens[-1])
            if seq.finish_reason is not None:
                self._end(seq)

    def _end(self, seq: Sequence) -> None:
        """No more tokens for seq: its reader's iteration ends (a cancelled reader that is
        still waiting, in another thread, is released)."""
        q = self._queues.pop(id(seq), None)
        if q is not None:
            q.put(_END)

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            q = self._queues.pop(id(seq), None)
            if q is not None:
                q.put(error)

    def _key(self, group: list[Sequence]) -> object:
        if not group[0].params.use_cache:
            return ("alone", id(group[0]))
        return "all" if self.mix_adapters else ("adapter", group[0].adapter)

    def _admit(self) -> list[list[Sequence]]:
        """Pending groups that fit in the batch now (a group larger than the batch runs when
        the batch is empty)."""
        taken: list[list[Sequence]] = []
        running = sum(len(d) for d in self._decoders.values())
        while self._pending:
            group = self._pending[0]
            if running and running + len(group) > self.max_batch:
                break
            taken.append(self._pending.popleft())
            running += len(group)
        return taken

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._pending or self._control or self._decoders):
                    self._wake.wait()
                groups = self._admit()
                self.stats.waiting -= sum(len(g) for g in groups)
                control = list(self._control)
                self._control.clear()
            for fn in control:
                if not self._run_control(fn):
                    with self._wake:
                        self._control.append(fn)
            for group in groups:
                live = [s for s in group if not s.cancelled.is_set()]
                for seq in group:
                    if seq.cancelled.is_set():
                        self._end(seq)
                if live:
                    self._prefill(live)
            for key, decoder in list(self._decoders.items()):
                rows = list(decoder.rows)
                try:
                    advanced = decoder.step()
                except Exception as e:  # noqa: BLE001 - a bug: fail these rows, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail(rows, e)
                    del self._decoders[key]
                    continue
                if advanced:
                    self.stats.steps += 1
                    self.stats.rows += len(advanced)
                self._deliver(advanced)
                for seq in rows:  # cancelled rows have left the batch
                    if seq.cancelled.is_set():
                        self._end(seq)
                if not len(decoder):
                    del self._decoders[key]
            self.stats.running = sum(len(d) for d in self._decoders.values())
            if control and not (self._pending or self._decoders):
                with self._wake:  # deferred control work retries without spinning
                    if self._control and not self._pending:
                        self._wake.wait(timeout=0.05)

    def _run_control(self, fn: Callable[[], bool]) -> bool:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - fn reports its own errors to its caller
            traceback.print_exc(file=sys.stderr)
            return True

    def _prefill(self, group: list[Sequence]) -> None:
        key = self._key(group)
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = BatchDecoder(self.model, use_cache=group[0].params.use_cache,
                                   adapters=True)
        try:
            decoder.add(group)
        except Exception as e:  # noqa: BLE001 - a bad sequence fails alone
            if not isinstance(e, ValueError):
                traceback.print_exc(file=sys.stderr)
            self._fail(group, e)
            return
        self.stats.prefills += 1
        if len(decoder):
            self._decoders[key] = decoder
        self._deliver(group)

    def adapters_in_use(self) -> set[str | None]:
        """Adapters of the sequences in the batch (read in the decoding thread)."""
        return {s.adapter for d in self._decoders.values() for s in d.rows}
