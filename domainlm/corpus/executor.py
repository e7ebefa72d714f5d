"""Where the corpus stage's parallel work runs: a local process pool (the default) or Ray (a
local Ray instance or an existing cluster). Both run the same functions on the same tasks;
the results depend only on the tasks, so the outputs are byte-identical either way."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from domainlm.errors import UserError

EXECUTORS = ("local", "ray")

# The records counter of the local pool's workers (set in each worker by the initializer),
# so that progress shows inside a large shard, not only when it ends.
_COUNTER: Any = None
# When the work runs in this process, the progress bar's refresh, called as records are read.
_TICK: Callable[[], None] | None = None


def _init_worker(counter: Any, tick: Callable[[], None] | None = None) -> None:
    global _COUNTER, _TICK
    _COUNTER, _TICK = counter, tick


def count_progress(n: int) -> None:
    """Add `n` records read to the pool's shared counter (no-op outside a local pool)."""
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += n
    if _TICK is not None:
        _TICK()


def _indexed(fn: Callable[[Any], Any], i: int, item: Any) -> tuple[int, Any]:
    return i, fn(item)


class LocalExecutor:
    """A fork process pool of `workers` processes (in this process when workers <= 1)."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.counter = mp.get_context("fork").Value("q", 0)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            tick: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
        """(index, fn(item)) for every item, in the order they finish; `tick` is called at
        least every half second while work is running (for progress bars)."""
        if self.workers <= 1 or len(items) <= 1:
            _init_worker(self.counter, tick)
            try:
                for i, item in enumerate(items):
                    yield i, fn(item)
            finally:
                _init_worker(None)
            return
        ctx = mp.get_context("fork")
        pool = ctx.Pool(min(self.workers, len(items)), _init_worker, (self.counter,))
        try:
            pending = [pool.apply_async(_indexed, (fn, i, item)) for i, item in enumerate(items)]
            while pending:
                still = []
                for res in pending:
                    if res.ready():
                        yield res.get()
                    else:
                        still.append(res)
                pending = still
                if pending:
                    pending[0].wait(0.5)
                    if tick is not None:
                        tick()
        except BaseException:
            pool.terminate()  # Ctrl-C or a failure: stop the workers now
            raise
        finally:
            pool.close()
            pool.join()

    def records_read(self) -> int:
        return int(self.counter.value)

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray tasks on a local instance (address None: started here, `workers` CPUs, on
    127.0.0.1) or on an existing cluster (`address`: "auto", "ray://host:10001", ...).

    On a cluster the build folder must be on a file system every node sees (the tasks read
    the shards and write the per-shard cache there), and domainlm installed on every node.
    """

    name = "ray"

    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            raise UserError("corpus.executor: ray is not installed (pip install ray)") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", num_cpus=max(1, workers), _node_ip_address="127.0.0.1",
                         **kwargs)
            self.started = True
        self._remote = ray.remote(_indexed)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            tick: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        fn_ref = ray.put(fn)
        refs = [self._remote.remote(fn_ref, i, item) for i, item in enumerate(items)]
        try:
            while refs:
                done, refs = ray.wait(refs, num_returns=1, timeout=0.5)
                for ref in done:
                    yield ray.get(ref)
                if tick is not None:
                    tick()
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def records_read(self) -> int:
        return 0

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(name: str, workers: int, address: str | None = None):
    if name not in EXECUTORS:
        raise UserError(f"corpus.executor: {name!r} is not one of {', '.join(EXECUTORS)}")
    if name == "ray":
        return RayExecutor(workers, address or os.environ.get("RAY_ADDRESS") or None)
    if address:
        raise UserError("--ray-address is for `--executor ray`; the local executor needs none")
    return LocalExecutor(workers)
