"""Score responses with a megatron checkpoint: one log-prob per response token.

    torchrun --nproc-per-node N -m gspo_megatron.score --ckpt DIR --input IN.jsonl \
        --output OUT.jsonl [--tp T --pp P --ep E --etp X --cp C --pp-layers a,b]
        [--max-tokens-per-microbatch T]

Each input line is ``{"prompt_ids": [...], "response_ids": [...]}``; the output has one line
``{"logprobs": [...]}`` per input line, in the same order, with ``len(response_ids)`` values.
Users check conversions and compute reference log-probs with it; it runs the same
forward + vocab-parallel log-prob path as training.

Rows are sorted by length and batched (``--micro-batch-size`` x ``--num-microbatches`` per
data-parallel rank per step); every rank reads the whole input so all ranks agree on shapes.
``--max-tokens-per-microbatch`` packs each step's rows end to end into rows of at most that many
tokens, as training does with ``loss.max_tokens_per_microbatch`` (block-diagonal attention, one
position range per sequence). Under ``--cp`` every row is split over the context-parallel ranks
as in training and the log-probs are put back together from all of them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Tuple

import torch

from gspo_megatron.checkpoint.atomic import (
    atomic_write_text,
    check_not_replacing_input,
    check_writable_dir,
)
from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
from gspo_megatron.distributed.context_parallel import zigzag_indices
from gspo_megatron.distributed.exchange import all_gather_objects
from gspo_megatron.distributed.parallel import (
    ParallelLayout,
    check_layout,
    init_distributed,
    parse_pp_layers,
    shutdown,
    world_size_from_env,
)
from gspo_megatron.errors import GspoError, exit_on_error
from gspo_megatron.jsonl import iter_objects
from gspo_megatron.learner.batch import (
    Sample,
    build_microbatch,
    cp_shard,
    pad_to_multiple,
    sequence_multiple,
)
from gspo_megatron.progress import progress_bar


def read_rows(path: Path, vocab_size: int, max_len: int) -> List[Tuple[List[int], List[int]]]:
    """Parse and validate every line before any model is built."""
    path = Path(path)
    if not path.is_file():
        raise GspoError(f"{path}: no such input file")
    rows = []
    for n, obj in iter_objects(path, "an object with prompt_ids and response_ids"):
        ids = []
        for field in ("prompt_ids", "response_ids"):
            value = obj.get(field)
            if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in value
            ):
                raise GspoError(f"{path}:{n}: '{field}' must be a list of token ids")
            bad = [t for t in value if not 0 <= t < vocab_size]
            if bad:
                raise GspoError(
                    f"{path}:{n}: '{field}' has token id {bad[0]} outside the "
                    f"vocabulary [0, {vocab_size})"
                )
            ids.append(value)
        if not ids[0]:
            raise GspoError(
                f"{path}:{n}: 'prompt_ids' is empty (the first response token needs "
                f"a preceding token)"
            )
        if len(ids[0]) + len(ids[1]) > max_len:
            raise GspoError(
                f"{path}:{n}: {len(ids[0]) + len(ids[1])} tokens exceed the model's "
                f"max_position_embeddings={max_len}"
            )
        rows.append((ids[0], ids[1]))
    if not rows:
        raise GspoError(f"{path}: no rows")
    return rows


def build_parser() -> argparse.ArgumentParser:
    prog, raw = "python -m gspo_megatron.score", argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=raw)
    p.add_argument("--ckpt", required=True, help="megatron checkpoint directory")
    p.add_argument("--input", required=True, help="JSONL with prompt_ids and response_ids")
    p.add_argument("--output", required=True, help="JSONL to write (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument(
        "--etp", type=int, default=None, help="expert tensor parallel size (default: tp)"
    )
    p.add_argument("--cp", type=int, default=1, help="context parallel size")
    p.add_argument("--pp-layers", default=None, help="layers per pipeline stage, e.g. 3,5")
    p.add_argument(
        "--max-tokens-per-microbatch",
        type=int,
        default=0,
        help="pack each step's rows into rows of at most this many tokens (0: padded rows)",
    )
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument(
        "--num-microbatches",
        type=int,
        default=None,
        help="micro-batches per step (default: 2 x pp)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="compute dtype (default: bf16 on GPU, fp32 on CPU)",
    )
    return p


def _dtype(name):
    if name is None:
        name = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def score(args) -> None:
    spec = checkpoint_spec(Path(args.ckpt))
    layout = ParallelLayout(
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        etp=args.etp,
        cp=args.cp,
        pp_layers=parse_pp_layers(args.pp_layers),
    )
    world = world_size_from_env()
    check_layout(layout, spec, world)
    rows = read_rows(Path(args.input), spec.vocab_size, spec.max_position_embeddings)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise GspoError(f"{out}: output file already exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise GspoError(f"--output {out}: is a directory; give a file name")
    check_not_replacing_input(out, Path(args.input), "--input")
    check_writable_dir(out.parent, "--output's directory")  # before the work, not after it
    for name in ("micro_batch_size", "num_microbatches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GspoError(f"--{name.replace('_', '-')}={value} must be >= 1")
    budget = args.max_tokens_per_microbatch
    longest = max(len(p) + len(r) for p, r in rows)
    if budget and budget < longest:
        raise GspoError(
            f"--max-tokens-per-microbatch={budget}: the longest row has {longest} tokens "
            f"(prompt + response); give at least that, or 0 for padded rows"
        )
    if budget < 0:
        raise GspoError(f"--max-tokens-per-microbatch={budget}: must be >= 0 (0: padded rows)")
    results = run_scoring(
        spec,
        layout,
        Path(args.ckpt),
        rows,
        args.micro_batch_size,
        args.num_microbatches or 2 * layout.pp,
        _dtype(args.dtype),
        budget,
    )
    if results is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps({"logprobs": lp}) + "\n" for lp in results))


def run_scoring(spec, layout, ckpt, rows, mbs, nmb, dtype, max_tokens: int = 0):
    """Start the process groups for ``layout``, score, shut them down. Returns the per-row
    log-prob lists on global rank 0, None elsewhere."""
    init_distributed(layout)
    try:
        return score_rows(spec, layout, ckpt, rows, mbs, nmb, dtype, max_tokens)
    finally:
        shutdown()


def _step_microbatches(samples, mbs: int, seq_len: int, max_tokens: int, multiple: int):
    """One step's micro-batches (un-split) and where each sample lies in them: per micro-batch
    a list of (row, first position, index into ``samples``). Padded: ``mbs`` rows each, a
    sample per row. Packed: one row each, samples end to end (collective: all ranks agree on
    the row length and the number of micro-batches)."""
    if not max_tokens:
        mbatches, places = [], []
        for k in range(0, len(samples), mbs):
            mbatches.append(build_microbatch(samples[k : k + mbs], seq_len))
            places.append([(j, 0, k + j) for j in range(mbs) if samples[k + j] is not None])
        return mbatches, places, seq_len
    from gspo_megatron.learner.packing import length_of, packed_with_bins

    real = [s for s in samples if s is not None]
    (mbatches,), seq_len, (bins,) = packed_with_bins([real], max_tokens, multiple)
    places = []
    for b in bins:
        starts = [0]
        for i in b:
            starts.append(starts[-1] + length_of(real[i]))
        places.append([(0, start, i) for start, i in zip(starts, b)])
    places += [[] for _ in range(len(mbatches) - len(bins))]  # fillers
    return mbatches, places, seq_len


def score_rows(spec, layout, ckpt, rows, mbs, nmb, dtype, max_tokens: int = 0):
    """``run_scoring`` in process groups that already exist for ``layout`` (every rank calls it).
    ``max_tokens`` > 0 packs each step's rows (``--max-tokens-per-microbatch``)."""
    # megatron (through the model and the forward pass) only now: the checks above answer bad
    # input before seconds of imports.
    from megatron.core import parallel_state as ps

    from gspo_megatron.learner.forward import forward_logprobs
    from gspo_megatron.models import build_model

    model = build_model(spec, layout, params_dtype=dtype)
    load_model_checkpoint(model, ckpt, spec)
    model.eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    per_rank = mbs * nmb
    mine = {}
    steps = range(0, len(order), per_rank * dp)
    with progress_bar(total=len(rows), desc="score", unit="seq") as bar:
        for start in steps:
            step_rows = order[start : start + per_rank * dp]
            longest = max(len(rows[i][0]) + len(rows[i][1]) for i in step_rows)
            multiple = sequence_multiple(layout.tp, layout.cp)
            seq_len = pad_to_multiple(longest, multiple)
            local = step_rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
            samples = [Sample(*rows[i]) for i in local] + [None] * (per_rank - len(local))
            mbatches, places, seq_len = _step_microbatches(
                samples, mbs, seq_len, max_tokens, multiple
            )
            shards = [cp_shard(mb, cp, cp_rank) for mb in mbatches]
            lps = forward_logprobs(model, shards, spec.vocab_size, seq_len)
            if lps is not None:
                held = zigzag_indices(seq_len, cp, cp_rank)  # this CP rank's positions
                for lp, mb_places in zip(lps, places):
                    full = torch.full((lp.shape[0], seq_len), float("nan"))
                    full[:, held] = lp
                    for row, first, k in mb_places:
                        p, r = rows[local[k]]
                        # Response token t is predicted at position len(p) - 1 + t.
                        at = first + len(p) - 1
                        mine[local[k]] = full[row, at : at + len(r)].tolist()
            bar.update(len(step_rows))
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    gathered = all_gather_objects(mine if keep else {})
    if torch.distributed.get_rank() != 0:
        return None
    # Under CP each rank holds its own positions of a row (NaN elsewhere): put them together.
    merged: dict = {}
    for part in gathered:
        for i, values in part.items():
            if i not in merged:
                merged[i] = values
            else:
                merged[i] = [b if math.isnan(a) else a for a, b in zip(merged[i], values)]
    return [merged[i] for i in range(len(rows))]


@exit_on_error
def main() -> None:
    args = build_parser().parse_args()
    score(args)


if __name__ == "__main__":
    main()
