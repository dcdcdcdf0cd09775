"""HF safetensors -> megatron-core torch_dist checkpoint, streamed tensor by tensor.

The output loads under any TP/PP/EP/ETP layout (megatron reshards on load); the HF
``config.json`` and tokenizer files travel inside it under ``hf/`` so the reverse conversion and
the trainer know the model without a second input, and so do, in ``hf/UNTRAINED_FILE``, the HF
tensors the family carries untrained (``models.untrained``: GLM's multi-token-prediction
layers), byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gspo_megatron.checkpoint.atomic import atomic_dir, check_not_replacing_input, check_output_dir
from gspo_megatron.checkpoint.dcp_io import write_dcp
from gspo_megatron.checkpoint.model import HF_SUBDIR, UNTRAINED_FILE
from gspo_megatron.checkpoint.run_dir import check_not_in_a_run
from gspo_megatron.checkpoint.safetensors_io import (
    AUX_FILES,
    HFCheckpointReader,
    StreamingSafetensorsWriter,
    estimated_output_bytes,
    tensor_nbytes,
)
from gspo_megatron.errors import GspoError
from gspo_megatron.models import hf_mapping, spec_from_hf_dir, untrained
from gspo_megatron.progress import progress_bar


def convert_hf_to_mcore(
    hf_dir: Path,
    out: Path,
    overwrite: bool = False,
    io_threads: int = 1,
    show_progress: bool = True,
) -> None:
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise GspoError(
            f"{hf_dir}: no such directory (expected a HF model directory with config.json)"
        )
    spec = spec_from_hf_dir(hf_dir)
    check_not_replacing_input(out, hf_dir, "--hf-dir")
    check_not_in_a_run(out)
    check_output_dir(out, overwrite)
    reader = HFCheckpointReader(hf_dir)
    mappings = hf_mapping(spec).tensor_mappings(spec)
    expected = [(n, s) for m in mappings for n, s in zip(m.hf_names, m.hf_shapes)]
    reader.check_tensors(expected)
    # Every source tensor must go somewhere: a config.json that describes fewer layers (or
    # experts) than the weights hold would otherwise convert into a truncated model.
    carried = sorted(n for n in reader.names if untrained(spec, n))
    unused = sorted(set(reader.names) - {n for n, _ in expected} - set(carried))
    if unused:
        raise GspoError(
            f"{hf_dir}: tensor '{unused[0]}' (and {len(unused) - 1} more) is not part of the "
            f"model config.json describes ({spec.num_layers} layers, {spec.num_experts} experts): "
            f"config.json does not belong to these weights"
        )

    shapes, producers = {}, {}
    for m in mappings:
        shapes[m.mcore_key] = (m.mcore_shape, reader.dtype(m.hf_names[0]))
        producers[m.mcore_key] = _producer(spec, m, reader)

    total_bytes = sum(tensor_nbytes(s, d) for s, d in shapes.values())
    total_bytes += sum(tensor_nbytes(reader.shape(n), reader.dtype(n)) for n in carried)
    needed = estimated_output_bytes(total_bytes, len(shapes), hf_dir)
    with atomic_dir(out, overwrite, needed_bytes=needed, what="conversion") as tmp:
        with progress_bar(
            total=total_bytes, desc="hf-to-mcore", unit="B", enabled=show_progress
        ) as bar:
            write_dcp(
                tmp,
                shapes,
                producers,
                on_tensor=lambda k: bar.update(tensor_nbytes(*shapes[k])),
                io_threads=io_threads,
            )
        (tmp / HF_SUBDIR).mkdir()
        if carried:
            entries = [(n, reader.shape(n), reader.dtype(n)) for n in carried]
            with StreamingSafetensorsWriter(tmp / HF_SUBDIR / UNTRAINED_FILE, entries) as writer:
                for name in carried:
                    writer.write(name, reader.get(name))
        for name in AUX_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / HF_SUBDIR / name)


def _producer(spec, mapping, reader):
    def produce():
        return (
            hf_mapping(spec)
            .to_mcore(spec, mapping, [reader.get(n) for n in mapping.hf_names])
            .contiguous()
        )

    return produce
