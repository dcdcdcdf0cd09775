"""Reading and writing HuggingFace safetensors checkpoints, one tensor at a time.

Reading: every shard named by ``model.safetensors.index.json`` (or the lone ``*.safetensors``
files) is opened and its header checked before any conversion starts, so a missing, truncated or
corrupt shard is reported by file name up front. Tensors are then read one at a time (mmap).

Writing: ``StreamingSafetensorsWriter`` writes the safetensors header first (shapes and dtypes
are known from the checkpoint metadata), then each tensor's bytes as they are produced, so peak
memory is one tensor rather than one shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from gspo_megatron.errors import GspoError

INDEX_NAME = "model.safetensors.index.json"
# Files copied alongside the weights so the converted model loads and tokenises as the source did.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# Bytes per tensor on top of its data, for the up-front space check: torch.save's zip framing in
# a DCP data file (about 1.6 KiB) plus the tensor's .metadata entry, or its safetensors header
# and index entries; rounded up (a 235B MoE has ~40k HF tensors: 160 MiB next to 470 GB).
PER_TENSOR_OVERHEAD = 4096

_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _ST_DTYPES.items()}


class HFCheckpointReader:
    """Maps HF tensor names to shard files; validates every shard before use.

    Tensors are read with plain file reads rather than mmap: mapped pages would stay resident
    (and count in RSS) for as long as the shard is open, which for a 235B checkpoint is the
    whole model.
    """

    def __init__(self, hf_dir: Path, files: Optional[Sequence[str]] = None) -> None:
        """``files``: read these files of ``hf_dir`` only (no index), instead of its shards."""
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_NAME
        if files is not None:
            files, weight_map = list(files), None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise GspoError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
            if not files:
                raise GspoError(f"{self.hf_dir}: no *.safetensors files and no {INDEX_NAME}")
            weight_map = None
        # name -> (file, dtype, shape, absolute byte offset, nbytes)
        self._entries: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.hf_dir / name
            if not path.is_file():
                raise GspoError(f"{path}: shard listed in {INDEX_NAME} is missing")
            header, data_start = _read_safetensors_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info.get("dtype") not in _DTYPES_BY_CODE:
                    raise GspoError(
                        f"{path}: tensor '{key}' has unsupported dtype {info.get('dtype')}"
                    )
                begin, end = info["data_offsets"]
                self._entries[key] = (
                    name,
                    _DTYPES_BY_CODE[info["dtype"]],
                    tuple(info["shape"]),
                    data_start + begin,
                    end - begin,
                )
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._entries or self._entries[key][0] != fname:
                    raise GspoError(
                        f"{self.hf_dir / fname}: index lists tensor '{key}' "
                        f"but the shard does not contain it"
                    )

    @property
    def names(self):
        return self._entries.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        fname, dtype, shape, offset, nbytes = self._entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.hf_dir / fname, "rb") as f:
            f.seek(offset)
            if f.readinto(buf.numpy()) != nbytes:
                raise GspoError(f"{self.hf_dir / fname}: truncated while reading '{name}'")
        return buf.view(dtype).reshape(shape)

    def check_tensors(self, expected: Sequence[Tuple[str, Tuple[int, ...]]]) -> None:
        """Every expected tensor present with the expected shape, else a line naming it."""
        for name, shape in expected:
            if name not in self._entries:
                raise GspoError(
                    f"{self.hf_dir}: tensor '{name}' is missing from the checkpoint "
                    f"(is config.json for this model?)"
                )
            found = self.shape(name)
            if found != tuple(shape):
                raise GspoError(
                    f"{self.hf_dir / self._entries[name][0]}: tensor '{name}' has shape "
                    f"{list(found)}, config.json implies {list(shape)}"
                )


def _read_safetensors_header(path: Path) -> Tuple[dict, int]:
    """Parse the header and check the data section is exactly as long as it says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(header_len))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise GspoError(f"{path}: corrupt safetensors shard ({err})") from None
    if 8 + header_len + end != size:
        raise GspoError(
            f"{path}: corrupt or truncated safetensors shard "
            f"(expected {8 + header_len + end} bytes, found {size})"
        )
    return header, 8 + header_len


class StreamingSafetensorsWriter:
    """Write one safetensors file whose tensor list is known in advance, tensor by tensor."""

    def __init__(
        self, path: Path, entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]
    ) -> None:
        self.path = Path(path)
        header, offset = {}, 0
        self._expected: List[Tuple[str, Tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dtype in entries:
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(self.path, "wb")
        self._next = 0
        self.total_bytes = offset
        try:
            self._file.write(struct.pack("<Q", len(blob)) + blob)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype, nbytes = self._expected[self._next]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {exp_name} {shape} {dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        assert len(data) == nbytes
        self._file.write(data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(
                f"{self.path}: {len(self._expected) - self._next} tensors not written"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close after a failure. A failed write leaves bytes in the buffer whose flush fails
        again; closed here, that second error is dropped rather than printed at exit as
        'Exception ignored' (the file is being removed anyway)."""
        with contextlib.suppress(OSError):
            self._file.close()


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n


def plan_shards(
    entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> List[List[Tuple[str, Tuple[int, ...], torch.dtype]]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards: List[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = tensor_nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_file_names(num_shards: int) -> List[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def estimated_output_bytes(tensor_bytes: int, num_tensors: int, aux_dir: Path) -> int:
    """Disk space a conversion's output takes: the tensors, their framing and the AUX_FILES
    found in ``aux_dir`` (copied along)."""
    aux = sum(
        (Path(aux_dir) / name).stat().st_size
        for name in AUX_FILES
        if (Path(aux_dir) / name).is_file()
    )
    return tensor_bytes + num_tensors * PER_TENSOR_OVERHEAD + aux
