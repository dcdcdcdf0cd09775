"""train/moe_route_change: the fraction of MoE expert choices that differ between pi_old and the
policy of the last minibatch step, on the response positions of one micro-batch."""

from __future__ import annotations

import json

from conftest import run_cli


def _run(tiny_moe, tp: int) -> dict:
    proc = run_cli(
        ["tests/workers/route_worker.py", str(tiny_moe.ckpt), str(tp)], nproc=tp if tp > 1 else 0
    )
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_route_change_is_zero_against_pi_old_and_layout_independent(tiny_moe):
    single = _run(tiny_moe, 1)
    # One minibatch: the compared policy is pi_old itself.
    assert single["k1"] == 0.0
    # Four minibatches with a large step: routes move; every response position x MoE layer x
    # top-k choice of the sampled micro-batch is compared, no more, no less.
    assert 0.0 < single["k4"] < 1.0
    for k in (1, 4):
        assert single[f"k{k}_choices"] == single[f"k{k}_expected"]
    # Tensor parallel with sequence parallelism splits router rows over ranks: the same tokens
    # are compared and (up to near-ties that TP rounding may flip) the same fraction comes out.
    tp2 = _run(tiny_moe, 2)
    assert tp2["k1"] == 0.0 and abs(tp2["k4"] - single["k4"]) <= 0.05, (tp2, single)
    assert all(tp2[f"k{k}_choices"] == single[f"k{k}_choices"] for k in (1, 4))
