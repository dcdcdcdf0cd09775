"""Write and read megatron-core ``torch_dist`` checkpoints one tensor at a time, in one process.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are megatron's
sharded keys and whose tensors are stored by global shape, plus megatron's ``metadata.json`` and
``common.pt``. Nothing in it depends on the parallel layout: megatron's loader reads, for each
rank, the slices that rank owns. So a converter can write it from a single process:

- ``write_dcp`` hands DCP placeholder (meta) tensors to plan with, and a planner whose
  ``resolve_data`` produces each real tensor only when the writer asks for it, so at most a few
  tensors are in memory at once.
- ``DcpTensorReader`` loads a chosen set of keys per call with cached metadata.

Failures: DCP reports any error, Ctrl-C included, as a ``CheckpointException`` (a
BaseException) wrapping the original, and ``torch.save`` into a stream turns a failed write
(ENOSPC, EFBIG) into an unrelated RuntimeError. Both are unwrapped here so that a caller sees
the OSError or the KeyboardInterrupt itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import signal
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _write_files_from_queue
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.futures import Future

from gspo_megatron.errors import GspoError, HungUp, Terminated

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; materialises each tensor when the storage writer reaches it."""

    def __init__(
        self, producers: Dict[str, Callable[[], torch.Tensor]], on_tensor: Callable[[str], None]
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._producers = producers
        self._on_tensor = on_tensor
        self.error: BaseException | None = None

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn not in self._producers:
            return super().resolve_data(write_item)
        try:
            tensor = self._producers[fqn]()
        except BaseException as err:
            # DCP's single-process error path loses the original exception (it fails on an
            # internal assertion instead), so keep it here to re-raise.
            self.error = err
            raise
        self._on_tensor(fqn)
        return tensor


class _Stopped(Exception):
    """Raised in a writer thread once another thread has failed."""


class _RecordingStream:
    """A file whose write errors are kept: torch.save reports them only as 'unexpected pos'."""

    def __init__(self, stream, errors: list) -> None:
        self._stream = stream
        self._errors = errors

    def write(self, data) -> int:
        try:
            return self._stream.write(data)
        except BaseException as err:
            self._errors.append(err)
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _RecordingFileSystem(FileSystem):
    def __init__(self, errors: list) -> None:
        super().__init__()
        self._errors = errors

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _RecordingStream(stream, self._errors)


class _StoppablePlanner:
    """The planner as DCP's writer loop sees it: refuses more tensors once ``stop`` is set."""

    def __init__(self, planner, stop: threading.Event) -> None:
        self._planner = planner
        self._stop = stop

    def resolve_data(self, write_item):
        if self._stop.is_set():
            raise _Stopped()
        return self._planner.resolve_data(write_item)


class _BoundedFileWriter(FileSystemWriter):
    """FileSystemWriter whose data files hold at most ``max_file_bytes`` each.

    DCP's writer keeps every tensor of a data file referenced until that file is complete, so
    the file size, not the tensor size, bounds memory. Stock DCP makes one file per thread
    (for a 235B model, hundreds of GB); here files are cut at a few of the largest tensors.
    """

    def __init__(self, path: str, max_file_bytes: int, **kwargs) -> None:
        super().__init__(path, single_file_per_rank=True, **kwargs)
        self.max_file_bytes = max_file_bytes
        self.write_errors: list = []  # OSError / KeyboardInterrupt raised by a file write
        self.fs = _RecordingFileSystem(self.write_errors)

    def write_data(self, plan, planner):
        buckets: list = [[]]
        size = 0
        for item in plan.items:
            nbytes = _item_bytes(item)
            if buckets[-1] and size + nbytes > self.max_file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += nbytes
        file_queue: queue.Queue = queue.Queue()
        for i, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            file_queue.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, file_queue)

    def _write_data(self, planner, file_queue: queue.Queue) -> Future:
        """DCP's thread pool, except that the first failure (a full disk in any thread, Ctrl-C
        in the main one) stops the other threads at their next tensor and is raised here once
        they have ended. Stock DCP lets them write on into a directory that is being removed,
        prints their errors as thread tracebacks and drops a failed thread's files from the
        metadata without an error."""
        results: queue.Queue = queue.Queue()
        failures: list = []
        stop = threading.Event()
        guarded = _StoppablePlanner(planner, stop)

        def work() -> None:
            try:
                _write_files_from_queue(
                    self.fs.create_stream,
                    file_queue,
                    results,
                    guarded,
                    self.transforms,
                    self.per_thread_copy_ahead,
                    self.sync_files,
                    self.thread_count,
                    self.serialization_format,
                )
            except BaseException as err:
                failures.append(err)
                stop.set()

        # Daemon threads: a second Ctrl-C must not leave the process waiting on them.
        threads = [threading.Thread(target=work, daemon=True) for _ in range(1, self.thread_count)]
        try:
            for t in threads:
                t.start()
            work()
            for t in threads:
                t.join()
        except BaseException as err:  # Ctrl-C outside a write (starting, waiting)
            failures.append(err)
            stop.set()
            for t in threads:
                if t.ident is not None:
                    t.join()
        if failures:
            raise _first_cause(failures)
        written = []
        while not results.empty():
            written += results.get_nowait()
        future: Future = Future()
        future.set_result(written)
        return future


def _first_cause(errors: list) -> BaseException:
    """Ctrl-C wins (the user asked to stop); else the first real error, not its echoes."""
    errors = [e for e in errors if e is not None and not isinstance(e, _Stopped)]
    for err in errors:
        if isinstance(err, KeyboardInterrupt):
            return err
    return errors[0] if errors else RuntimeError("checkpoint writer stopped without a cause")


@contextlib.contextmanager
def _noting_signals(noted: list):
    """Record SIGINT / SIGTERM / SIGHUP in ``noted`` before their handlers (which raise) run. A signal
    that lands inside torch.save's C++ writer raises in the Python write callback it calls,
    where the C++ side swallows the exception and either reports 'unexpected pos' (seen in a
    CI run: exit 1 and a traceback instead of 130 and one line) or writes on to the end (exit
    0, the user's Ctrl-C ignored; 2 of 15 runs of the signal test): the interrupt must win."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }

    def note(signum, frame):
        noted.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(noted: list) -> BaseException:
    """The exception a noted signal's handler raised (which the writer may have swallowed)."""
    if noted[0] == signal.SIGINT:
        return KeyboardInterrupt()
    return HungUp() if noted[0] == signal.SIGHUP else Terminated()


@contextlib.contextmanager
def _single_process():
    """DCP warns on every call without a process group that it assumes one process, which is
    the point here: two lines of noise per conversion."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def root_cause(err: BaseException) -> BaseException:
    """The exception DCP wrapped in a CheckpointException (for each rank; one rank here)."""
    while isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return err


def _item_bytes(item) -> int:
    if item.tensor_data is None:
        return 0
    n = torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
    for s in item.tensor_data.chunk.sizes:
        n *= s
    return n


def write_dcp(
    out_dir: Path,
    shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
    producers: Dict[str, Callable[[], torch.Tensor]],
    on_tensor: Callable[[str], None] = lambda key: None,
    io_threads: int = 1,
) -> None:
    """Write a torch_dist checkpoint whose tensors come from ``producers`` one at a time.

    Peak memory: about ``io_threads`` data files of max(2 x largest tensor, 16 MiB) each.
    """
    placeholders = {
        k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()
    }
    largest = max((p.numel() * p.element_size() for p in placeholders.values()), default=0)
    writer = _BoundedFileWriter(
        str(out_dir), max_file_bytes=max(2 * largest, 16 * 1024**2), thread_count=io_threads
    )
    planner = _LazySavePlanner(producers, on_tensor)
    noted: list = []
    try:
        with _single_process(), _noting_signals(noted):
            dcp.save(placeholders, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException as err:  # DCP's CheckpointException derives from BaseException
        if noted:  # Ctrl-C or SIGTERM, whatever the writer made of it
            raise _interrupt(noted) from None
        # The real cause: a full disk (hidden by torch.save), Ctrl-C, a bad source shard.
        raise _first_cause([*writer.write_errors, planner.error, root_cause(err)]) from None
    if noted:  # swallowed where the C++ writer called back into Python, and the write went on
        raise _interrupt(noted)
    (Path(out_dir) / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    common = io.BytesIO()  # torch.save straight to a file would hide a write error's errno
    torch.save({}, common)
    (Path(out_dir) / "common.pt").write_bytes(common.getvalue())


class _CachedReader(FileSystemReader):
    """Reads .metadata once; the converter issues one load per tensor group."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class DcpTensorReader:
    """Global shapes/dtypes of a torch_dist checkpoint and per-key loading."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        if (
            not (self.ckpt_dir / "metadata.json").is_file()
            or not (self.ckpt_dir / ".metadata").is_file()
        ):
            raise GspoError(
                f"{self.ckpt_dir}: not a megatron torch_dist checkpoint "
                f"(metadata.json or .metadata missing)"
            )
        self._reader = _CachedReader(str(self.ckpt_dir))
        try:
            metadata = self._reader.read_metadata()
        except Exception as err:
            raise GspoError(
                f"{self.ckpt_dir / '.metadata'}: unreadable checkpoint metadata ({err})"
            ) from None
        self.tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {
            k: (tuple(md.size), md.properties.dtype)
            for k, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        self.storage_files = sorted(
            {str(info.relative_path) for info in metadata.storage_data.values()}
        )
        for name in self.storage_files:
            if not (self.ckpt_dir / name).is_file():
                raise GspoError(f"{self.ckpt_dir / name}: checkpoint data file is missing")

    def load(self, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
        out = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys}
        try:
            with _single_process():
                dcp.load(out, storage_reader=self._reader, no_dist=True)
        except BaseException as err:
            cause = root_cause(err)
            if not isinstance(cause, Exception):  # Ctrl-C stays Ctrl-C, not a corrupt file
                raise cause from None
            raise GspoError(
                f"{self.ckpt_dir}: failed to read tensors {sorted(out)[:3]} "
                f"(corrupt data file?): {str(cause).splitlines()[0][:200]}"
            ) from None
        return out
