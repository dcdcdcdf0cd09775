"""The KV-cache fit check (rollout.kv_cache): block bytes and the start-up line, against the
arithmetic written out; tests/test_rollout.py checks the block bytes against vLLM's own count."""

import math

from gspo_megatron.models import spec_from_hf_config
from gspo_megatron.rollout.engines.kv_cache import block_bytes, holding_gib, waves_note

QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"],
    vocab_size=64,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    hidden_size=512,
)


def spec(**changes):
    return spec_from_hf_config({k: v for k, v in {**QWEN3, **changes}.items() if v is not None})


def test_block_bytes_is_keys_and_values_of_every_layer():
    # keys + values, 4 layers, 4 KV heads of 512 / 8 = 64, 128 tokens, fp32: 1 MiB.
    assert block_bytes(spec(), 4, 1, 128) == 2 * 4 * 4 * 64 * 128 * 4 == 1 << 20
    # An explicit head_dim wins over hidden / heads; bf16 halves it.
    assert block_bytes(spec(head_dim=128), 2, 1, 128) == 2 * 4 * 4 * 128 * 128 * 2
    # TP splits the KV heads; past their count each rank keeps one (vLLM replicates them).
    assert block_bytes(spec(), 4, 2, 128) == (1 << 20) // 2
    assert block_bytes(spec(), 4, 8, 128) == (1 << 20) // 4
    # No num_key_value_heads: multi-head attention, one KV head per query head.
    assert block_bytes(spec(num_key_value_heads=None), 4, 1, 16) == 2 * 4 * 8 * 64 * 16 * 4


def test_a_step_that_fits_says_nothing():
    # 51 blocks of 128 tokens; sequences of up to 24 tokens take one block each.
    assert waves_note(51, 24, 51, 128, 1 << 20, on_gpu=False) is None
    assert waves_note(1, 24, 51, 128, 1 << 20, on_gpu=False) is None
    # 300 tokens take 3 blocks: 17 sequences fit in 51 blocks, 18 do not.
    assert waves_note(17, 300, 51, 128, 1 << 20, on_gpu=False) is None
    assert waves_note(18, 300, 51, 128, 1 << 20, on_gpu=False) is not None


def test_a_crowded_step_says_how_many_fit_and_what_holds_them():
    # The bench's `m` shape on the demo config: 0.05 GiB = 51 blocks of 1 MiB, 128 sequences.
    note = waves_note(128, 24, 51, 128, 1 << 20, on_gpu=False)
    assert "holds 51 sequences" in note and "samples 128 per engine" in note
    assert "up to 3 waves" in note  # ceil(128 / 51)
    # 128 MiB = 0.125 GiB, rounded up at two significant digits.
    assert note.endswith("rollout.kv_cache_gib=0.13 holds them all")
    assert "\n" not in note
    # On GPU the knob is the memory fraction; the size is still given.
    gpu = waves_note(128, 24, 51, 128, 1 << 20, on_gpu=True)
    assert "about 0.13 GiB" in gpu and "rollout.gpu_memory_utilization" in gpu


def test_the_size_suggested_holds_the_step():
    # Whatever the shape, a cache of the size printed has the blocks for every sequence.
    for sequences, length, block, nbytes in [
        (128, 24, 128, 1 << 20),
        (64, 1100, 128, 3 * 2**19),
        (1024, 4096, 16, 12345),
        (7, 129, 128, 2**30 // 5),
    ]:
        note = waves_note(sequences, length, 1, block, nbytes, on_gpu=False)
        gib = float(note.rsplit("rollout.kv_cache_gib=", 1)[1].split()[0])
        assert gib == holding_gib(sequences, length, block, nbytes)  # what bench_step sets
        blocks = math.floor(gib * 2**30 / nbytes)
        assert waves_note(sequences, length, blocks, block, nbytes, on_gpu=False) is None
