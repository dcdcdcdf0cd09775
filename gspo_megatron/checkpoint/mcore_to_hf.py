"""megatron-core torch_dist checkpoint -> HF sharded safetensors, streamed tensor by tensor.

Writes ``config.json`` (the source's, byte for byte), the tokenizer files when the checkpoint
carries them, the safetensors shards and, for more than one shard, the index. The HF tensors the
checkpoint carries untrained (``hf/UNTRAINED_FILE``: GLM's multi-token-prediction layers) go
into the shards after the model's, as they came. Shapes and dtypes
come from the checkpoint metadata, so every shard's header is written before its tensors and
each tensor is read, converted and written on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gspo_megatron.checkpoint.atomic import atomic_dir, check_not_replacing_input, check_output_dir
from gspo_megatron.checkpoint.dcp_io import DcpTensorReader
from gspo_megatron.checkpoint.model import HF_SUBDIR, UNTRAINED_FILE, checkpoint_spec
from gspo_megatron.checkpoint.run_dir import check_not_in_a_run
from gspo_megatron.checkpoint.safetensors_io import (
    AUX_FILES,
    INDEX_NAME,
    HFCheckpointReader,
    StreamingSafetensorsWriter,
    estimated_output_bytes,
    plan_shards,
    shard_file_names,
    tensor_nbytes,
)
from gspo_megatron.errors import GspoError
from gspo_megatron.models import hf_mapping
from gspo_megatron.progress import progress_bar

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def convert_mcore_to_hf(
    ckpt: Path,
    out: Path,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    show_progress: bool = True,
) -> None:
    ckpt, out = Path(ckpt), Path(out)
    spec = checkpoint_spec(ckpt)
    check_not_replacing_input(out, ckpt, "--ckpt")
    check_not_in_a_run(out)
    check_output_dir(out, overwrite)
    reader = DcpTensorReader(ckpt)
    mappings = hf_mapping(spec).tensor_mappings(spec)
    # The model's tensors only (a training checkpoint also holds the optimizer's), each one
    # used: weights config.json does not describe would otherwise be dropped without a word.
    model_keys = {k for k in reader.tensors if not k.startswith("optimizer.")}
    unused = sorted(model_keys - {m.mcore_key for m in mappings})
    if unused:
        raise GspoError(
            f"{ckpt}: tensor '{unused[0]}' (and {len(unused) - 1} more) is not part of the "
            f"model {ckpt / HF_SUBDIR / 'config.json'} describes ({spec.num_layers} layers, "
            f"{spec.num_experts} experts): the config does not belong to these weights"
        )
    for m in mappings:
        if m.mcore_key not in reader.tensors:
            raise GspoError(
                f"{ckpt}: tensor '{m.mcore_key}' missing; the checkpoint is of another "
                f"model shape than {ckpt / HF_SUBDIR / 'config.json'}"
            )
        shape = reader.tensors[m.mcore_key][0]
        if shape != m.mcore_shape:
            raise GspoError(
                f"{ckpt}: tensor '{m.mcore_key}' has shape {list(shape)}, "
                f"config.json implies {list(m.mcore_shape)} (another model shape)"
            )

    entries, source = [], {}
    for m in mappings:
        dtype = reader.tensors[m.mcore_key][1]
        for name, shape in zip(m.hf_names, m.hf_shapes):
            entries.append((name, shape, dtype))
            source[name] = m
    carried = None
    if (ckpt / HF_SUBDIR / UNTRAINED_FILE).is_file():
        carried = HFCheckpointReader(ckpt / HF_SUBDIR, files=[UNTRAINED_FILE])
        for name in sorted(carried.names):
            entries.append((name, carried.shape(name), carried.dtype(name)))
            source[name] = None
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(tensor_nbytes(s, d) for _, s, d in entries)
    needed = estimated_output_bytes(total, len(entries), ckpt / HF_SUBDIR)

    with (
        atomic_dir(out, overwrite, needed_bytes=needed, what="conversion") as tmp,
        progress_bar(total=total, desc="mcore-to-hf", unit="B", enabled=show_progress) as bar,
    ):
        pending = {}  # HF tensors produced but not yet written (q/k/v may straddle shards)
        for shard, fname in zip(shards, names):
            with StreamingSafetensorsWriter(tmp / fname, shard) as writer:
                for name, shape, dtype in shard:
                    if source[name] is None:
                        pending[name] = carried.get(name)
                    elif name not in pending:
                        m = source[name]
                        t = reader.load([m.mcore_key])[m.mcore_key]
                        pending.update(hf_mapping(spec).to_hf(spec, m, t))
                    writer.write(name, pending.pop(name))
                    bar.update(tensor_nbytes(shape, dtype))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {
                    name: fname for shard, fname in zip(shards, names) for name, _, _ in shard
                },
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        for name in AUX_FILES:
            if (ckpt / HF_SUBDIR / name).is_file():
                shutil.copy2(ckpt / HF_SUBDIR / name, tmp / name)
