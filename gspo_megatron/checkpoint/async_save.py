"""Checkpoint writes off the step's critical path (``train.async_save``).

megatron-core's ``dist_checkpointing.save(..., async_sharded_save=True)`` stages the tensors in
host memory and returns a request; its ``AsyncCallsQueue`` runs the file writes in a forked
process while training goes on, and runs the request's finalize functions on every rank once
all ranks' writers are done (a collective check, made here at the end of each step). The
checkpoint's completion (``training._complete``: the HF files, fsync, the rename from its
temporary name, ``latest``, pruning) is such a finalize function, so a checkpoint is named
complete only after every byte of it is written: atomic as a synchronous save is.
"""

from __future__ import annotations

from typing import Callable, Optional


class AsyncSaver:
    """One checkpoint write in flight at a time; ``poll`` after each step, ``finish`` before
    anything reads the newest checkpoint and at the end of the run."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        self._on_error: Optional[Callable[[BaseException], None]] = None

    def schedule(self, request, complete: Callable[[], None], on_error) -> None:
        """Start writing ``request``'s files; ``complete`` runs after megatron's own finalize
        (its metadata); ``on_error(err)`` turns a failed write or completion into the run's
        stop (it raises)."""
        request.add_finalize_fn(complete)
        self._on_error = on_error
        self.queue.schedule_async_request(request)

    @property
    def in_flight(self) -> bool:
        return self.queue.get_num_unfinalized_calls() > 0

    def poll(self) -> None:
        """Complete the checkpoint if every rank has written its files (collective)."""
        self._finalize(blocking=False)

    def finish(self) -> None:
        """Wait for the write in flight and complete its checkpoint (collective)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if not self.in_flight:
            return
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as err:
            self.queue.async_calls.clear()
            on_error, self._on_error = self._on_error, None
            on_error(err)
            raise

    def abort(self) -> None:
        """The run is failing: stop the writer without completing its checkpoint (other ranks
        may be gone, so nothing collective); its partial directory is cleared by the next run."""
        self.queue.close(abort=True)
