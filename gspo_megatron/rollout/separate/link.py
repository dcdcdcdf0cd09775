"""What crosses between the trainer and separate rollout ranks: weights down, batches up.

Over the link group (``rollout.placement``: the first training rank = link rank 0, the rollout
ranks 1..). A weight transfer is a header (policy version, the next batch to sample), then the
HF-named tensors of the trainer's ``WeightGatherer`` in buckets of at most
``rollout.sync_bucket_mb`` (a bucket's names and shapes as a small object, then one flat buffer,
broadcast from link rank 0), then an end marker; every rollout rank receives every tensor and its
engine loads them as they arrive (vLLM's loaders take full tensors and slice them). A batch is
one pickled object sent from the first rollout rank to the first training rank, which shares it
with the other training ranks.

Every wait is bounded by the groups' timeout (``train.collective_timeout_s``); a peer that died
closes its connections, which ends the wait at once. ``LinkError`` names the side that failed.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

ROOT = 0  # link rank of the first training rank
FIRST_ROLLOUT = 1
BATCH_TAG = 7


class LinkError(RuntimeError):
    """The other side of the link died, hung or closed its connection."""


@dataclass
class TransferStats:
    seconds: float = 0.0
    bytes: int = 0
    version: int = -1

    @property
    def metrics(self):
        return {"perf/transfer_seconds": self.seconds, "perf/transfer_gb": self.bytes / 1e9}


def _wait(start, what: str) -> None:
    """``start()`` posts an operation (gloo may fail right there, on a closed pair), then waits."""
    try:
        start().wait()
    except RuntimeError as err:
        raise LinkError(f"{what}: {' '.join(str(err).split())[:200]}") from None


def _bcast(pg, tensor: torch.Tensor, root: int, what: str) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    _wait(lambda: pg.broadcast([tensor], opts), what)


def bcast_object(pg, obj, root: int, me: int, what: str):
    """``obj`` from link rank ``root`` to every link rank (others pass None)."""
    if me == root:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    _bcast(pg, size, root, what)
    if me != root:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    _bcast(pg, data, root, what)
    return obj if me == root else pickle.loads(data.numpy().tobytes())


def send_object(pg, obj, dst: int, what: str) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    _wait(lambda: pg.send([size], dst, BATCH_TAG), what)
    _wait(lambda: pg.send([data], dst, BATCH_TAG), what)


def recv_object(pg, src: int, what: str):
    size = torch.zeros(1, dtype=torch.int64)
    _wait(lambda: pg.recv([size], src, BATCH_TAG), what)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    _wait(lambda: pg.recv([data], src, BATCH_TAG), what)
    return pickle.loads(data.numpy().tobytes())


def send_weights(
    groups,
    me: Optional[int],
    named: Iterable[Tuple[str, torch.Tensor]],
    header: dict,
    bucket_bytes: int,
) -> TransferStats:
    """Trainer side. Every training rank calls it (the gatherer's iteration is collective over
    them); link rank 0 sends, the others only take part in the gather."""
    t0, stats = time.perf_counter(), TransferStats(version=header["version"])
    if me is None:
        for _ in named:
            pass
        return stats
    what = "sending weights to the rollout ranks"
    bcast_object(groups.cpu, header, ROOT, me, what)
    pending, size = [], 0

    def flush():
        nonlocal pending, size
        if not pending:
            return
        manifest = [(n, tuple(t.shape), str(t.dtype)) for n, t in pending]
        bcast_object(groups.cpu, manifest, ROOT, me, what)
        flat = torch.cat([t.reshape(-1) for _, t in pending])
        if groups.gpu is not None:
            flat = flat.cuda()
        _bcast(groups.weights, flat, ROOT, what)
        stats.bytes += flat.numel() * flat.element_size()
        pending, size = [], 0

    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if pending and (size + nbytes > bucket_bytes or t.dtype != pending[0][1].dtype):
            flush()
        pending.append((name, t.detach()))
        size += nbytes
    flush()
    bcast_object(groups.cpu, None, ROOT, me, what)
    stats.seconds = time.perf_counter() - t0
    return stats


def receive_header(groups, me: int) -> dict:
    return bcast_object(groups.cpu, None, ROOT, me, "waiting for the trainer's weights")


def receive_weights(groups, me: int, stats: TransferStats) -> Iterator[Tuple[str, torch.Tensor]]:
    """Rollout side, after ``receive_header``: the transfer's tensors as they arrive."""
    what = "receiving weights from the trainer"
    t0 = time.perf_counter()
    while True:
        manifest = bcast_object(groups.cpu, None, ROOT, me, what)
        if manifest is None:
            break
        dtype = getattr(torch, manifest[0][2].removeprefix("torch."))
        numel = sum(math.prod(shape) for _, shape, _ in manifest)
        device = "cuda" if groups.gpu is not None else "cpu"
        flat = torch.empty(numel, dtype=dtype, device=device)
        _bcast(groups.weights, flat, ROOT, what)
        stats.bytes += flat.numel() * flat.element_size()
        pos = 0
        for name, shape, _ in manifest:
            n = math.prod(shape)
            yield name, flat[pos : pos + n].view(shape)
            pos += n
    stats.seconds = time.perf_counter() - t0
