"""Write and read megatron-core ``torch_dist`` checkpoints one tensor at a time, in one process.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are megatron's
sharded keys and whose tensors are stored by global shape, plus megatron's ``metadata.json`` and
``common.pt``. Nothing in it depends on the parallel layout: megatron's loader reads, for each
rank, the slices that rank owns. So a converter can write it from a single process:

- ``write_dcp`` hands DCP placeholder (meta) tensors to plan with, and a planner whose
  ``resolve_data`` produces each real tensor only when the writer asks for it, so at most a few
  tensors are in memory at once.
- ``DcpTensorReader`` loads a chosen set of keys per call with cached metadata.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from gspo_megatron.errors import GspoError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; materialises each tensor when the storage writer reaches it."""

    def __init__(self, producers: Dict[str, Callable[[], torch.Tensor]],
                 on_tensor: Callable[[str], None]) -> None:
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


class _BoundedFileWriter(FileSystemWriter):
    """FileSystemWriter whose data files hold at most ``max_file_bytes`` each.

    DCP's writer keeps every tensor of a data file referenced until that file is complete, so
    the file size, not the tensor size, bounds memory. Stock DCP makes one file per thread
    (for a 235B model, hundreds of GB); here files are cut at a few of the largest tensors.
    """

    def __init__(self, path: str, max_file_bytes: int, **kwargs) -> None:
        super().__init__(path, single_file_per_rank=True, **kwargs)
        self.max_file_bytes = max_file_bytes

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


def _item_bytes(item) -> int:
    if item.tensor_data is None:
        return 0
    n = torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
    for s in item.tensor_data.chunk.sizes:
        n *= s
    return n


def write_dcp(out_dir: Path, shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
              producers: Dict[str, Callable[[], torch.Tensor]],
              on_tensor: Callable[[str], None] = lambda key: None, io_threads: int = 1) -> None:
    """Write a torch_dist checkpoint whose tensors come from ``producers`` one at a time.

    Peak memory: about ``io_threads`` data files of max(2 x largest tensor, 16 MiB) each.
    """
    placeholders = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
    largest = max((p.numel() * p.element_size() for p in placeholders.values()), default=0)
    writer = _BoundedFileWriter(str(out_dir), max_file_bytes=max(2 * largest, 16 * 1024**2),
                                thread_count=io_threads)
    planner = _LazySavePlanner(producers, on_tensor)
    try:
        dcp.save(placeholders, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException:  # DCP's CheckpointException derives from BaseException
        if planner.error is not None:
            raise planner.error from None  # the real cause: a bad shard, a full disk
        raise
    (Path(out_dir) / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    torch.save({}, Path(out_dir) / "common.pt")


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
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.ckpt_dir = Path(ckpt_dir)
        if not (self.ckpt_dir / "metadata.json").is_file() or not (self.ckpt_dir / ".metadata").is_file():
            raise GspoError(f"{self.ckpt_dir}: not a megatron torch_dist checkpoint "
                            f"(metadata.json or .metadata missing)")
        self._reader = _CachedReader(str(self.ckpt_dir))
        try:
            metadata = self._reader.read_metadata()
        except Exception as err:
            raise GspoError(f"{self.ckpt_dir / '.metadata'}: unreadable checkpoint metadata ({err})") from None
        self.tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {
            k: (tuple(md.size), md.properties.dtype)
            for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }
        self.storage_files = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
        for name in self.storage_files:
            if not (self.ckpt_dir / name).is_file():
                raise GspoError(f"{self.ckpt_dir / name}: checkpoint data file is missing")

    def load(self, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
        out = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys}
        try:
            dcp.load(out, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as err:
            raise GspoError(f"{self.ckpt_dir}: failed to read tensors {sorted(out)[:3]} "
                            f"(corrupt data file?): {str(err).splitlines()[0][:200]}") from None
        return out
