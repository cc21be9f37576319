"""Snapshot files of :class:`~emalora_fast.PostHocEMA`: atomic writes from a bounded background
queue, the run that owns a snapshot directory, and write failures that are never lost.

A snapshot directory holds, per rank, one run file ``posthoc-run.json`` (``-rank<r>`` before the
extension on ranks > 0) naming the run that writes there, and that run's
``snapshot-<global step>.safetensors`` files (each also carries the run id in its metadata). A
file is written to ``<name>.tmp``, made readable like any file the process creates (mode
``0o666 & ~umask``), synced, then renamed: a file with the final name is always complete.

Failures: a write that raised is kept until the averager reports it (at its next ``update()``,
``flush()``, ``close()``, ...); one still unreported when the interpreter exits is printed to
stderr and the process exits with status 1 (from an ``atexit`` hook, after the worker threads
have finished their writes).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import distributed

SNAPSHOT_FORMAT = 2
_SNAPSHOT = re.compile(r"snapshot-(\d+)(-rank\d+)?\.safetensors(\.tmp)?$")


def rank_suffix() -> str:
    """``""`` on rank 0 (and without torch.distributed), ``-rank<r>`` on the others."""
    rank = torch.distributed.get_rank() if distributed._initialized() else 0
    return f"-rank{rank}" if rank else ""


def snapshot_name(step: int, suffix: str) -> str:
    return f"snapshot-{step:09d}{suffix}.safetensors"


def run_file(directory: str, suffix: str) -> str:
    return os.path.join(directory, f"posthoc-run{suffix}.json")


def read_run_id(directory: str, suffix: str) -> str | None:
    """The run id written in the directory for this rank, or None when there is no run file."""
    try:
        with open(run_file(directory, suffix)) as f:
            return str(json.load(f)["run_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"<unreadable run file: {exc}>"


def write_run_id(directory: str, suffix: str, run_id: str) -> None:
    path = run_file(directory, suffix)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": SNAPSHOT_FORMAT, "run_id": run_id}, f)
    os.replace(tmp, path)


def listing(directory: str, suffix: str) -> tuple[list[int], list[str]]:
    """(steps of this rank's snapshot files, names of this rank's leftover ``.tmp`` files)."""
    steps, tmps = [], []
    for name in os.listdir(directory):
        m = _SNAPSHOT.fullmatch(name)
        if m is None or (m.group(2) or "") != suffix:
            continue
        if m.group(3):
            tmps.append(name)
        else:
            steps.append(int(m.group(1)))
    return sorted(steps), sorted(tmps)


def remove_files(directory: str, names: list[str]) -> None:
    for name in names:
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def write_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    """Write a safetensors file at ``path`` through ``path + '.tmp'``."""
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates the file with mode 0600
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_snapshot(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str, suffix: str
) -> None:
    """The writer's job: check that the directory still belongs to this run, then write (a
    failed write leaves no ``.tmp`` file behind)."""
    directory = os.path.dirname(path)
    owner = read_run_id(directory, suffix)
    if owner != meta["run_id"]:
        raise RuntimeError(
            f"the snapshot directory now belongs to run {owner} (another averager was created "
            f"on it with overwrite=True?), not to this run {meta['run_id']}"
        )
    try:
        write_atomic(tensors, meta, path)
    except BaseException:
        remove_files(directory, [os.path.basename(path) + ".tmp"])
        raise


def read_snapshot(path: str, run_id: str) -> dict[str, torch.Tensor]:
    """The tensors of a snapshot file, checked to belong to run ``run_id``."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        theirs = (f.metadata() or {}).get("run_id")
        if theirs != run_id:
            raise RuntimeError(f"snapshot {path} belongs to run {theirs}, not to this run {run_id}")
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)


class SnapshotWriteError(RuntimeError):
    """One or more snapshot writes failed; every failure is listed (``failures``: tuples
    ``(global step, path, exception)``) and the index keeps only the snapshots written."""

    def __init__(
        self, failures: list[tuple[int, str, BaseException]], written: list[int] | None = None
    ) -> None:
        self.failures = failures
        lines = "; ".join(f"step {s} -> {p}: {type(e).__name__}: {e}" for s, p, e in failures)
        kept = "" if written is None else f" The snapshots written (steps {written}) are listed."
        super().__init__(
            f"{len(failures)} snapshot write(s) failed: {lines}.{kept} Fix the directory "
            "(space, permissions) and go on: later snapshots are written as usual, and "
            "state_dict() resumes from the snapshots on disk"
        )


class SnapshotWriter:
    """One background thread writing snapshot files in order, at most ``max_pending`` at once.

    Every method is called from the averager's thread; the worker thread only runs the jobs.
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, str, Future, list]] = deque()  # step, path, future, bufs
        self._free: list[list[torch.Tensor]] = []  # host buffers of finished writes, for reuse
        self._failures: list[tuple[int, str, BaseException]] = []
        self._written: list[tuple[int, str]] = []

    def host_buffers(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors shaped like ``like`` for the next snapshot: those of a finished write
        when their shapes fit (no allocation per snapshot), else new ones. Call
        :meth:`wait_for_room` first."""
        while self._free:
            bufs = self._free.pop()
            if [b.shape for b in bufs] == [t.shape for t in like]:
                return bufs
        return [torch.empty(t.shape, dtype=t.dtype) for t in like]

    def submit(self, step: int, path: str, buffers: list[torch.Tensor], fn, *args) -> None:
        """Queue ``fn(*args)``, the write of snapshot ``step`` to ``path`` from ``buffers``
        (from :meth:`host_buffers`; reused once the write is finished)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posthoc-ema")
        _OPEN.add(self)
        self._pending.append((step, path, self._executor.submit(fn, *args), buffers))

    def wait_for_room(self) -> None:
        """Back-pressure: block until fewer than ``max_pending`` writes are in flight."""
        while len(self._pending) >= self.max_pending:
            self._pending[0][2].exception()  # waits; the result is collected by reap()
            self._reap_done()

    def _reap_done(self) -> None:
        while self._pending and self._pending[0][2].done():
            step, path, fut, buffers = self._pending.popleft()
            self._free.append(buffers)
            exc = fut.exception()
            if exc is None:
                self._written.append((step, path))
            else:
                self._failures.append((step, path, exc))

    def reap(self) -> list[tuple[int, str]]:
        """The (step, path) of the writes finished since the last call (failures are kept for
        :meth:`take_failures`). Does not wait."""
        self._reap_done()
        written, self._written = self._written, []
        if not self._pending and not self._failures:
            _OPEN.discard(self)
        return written

    def wait_all(self) -> list[tuple[int, str]]:
        """Wait for every queued write; returns those written since the last reap."""
        for _, _, fut, _ in list(self._pending):
            fut.exception()
        return self.reap()

    def take_failures(self) -> list[tuple[int, str, BaseException]]:
        failures, self._failures = self._failures, []
        if not self._pending:
            _OPEN.discard(self)
        return failures

    @property
    def pending_steps(self) -> list[int]:
        return [s for s, _, f, _ in self._pending if not f.done()]

    def shutdown(self) -> None:
        """Stop the worker thread once its queue is written (a later submit starts another)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._reap_done()
        self._free.clear()
        if not self._pending and not self._failures:
            _OPEN.discard(self)


_OPEN: set[SnapshotWriter] = set()  # writers with writes in flight or failures not reported


@atexit.register
def _report_unreported_failures() -> None:
    """At exit (the worker threads have finished): a failed write nobody was told about is
    printed and the exit status becomes 1."""
    failures = []
    for writer in list(_OPEN):
        writer.wait_all()
        failures += writer.take_failures()
    if not failures:
        return
    print(f"emalora_fast: {SnapshotWriteError(failures)}", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(1)
