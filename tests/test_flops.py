"""The FLOP count behind tools/gpu_check.py's TFLOP/s and MFU, against PyTorch's own count of
HF transformers' eager forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from gspo_megatron.flops import forward_flops, peak_bf16_tflops, train_flops
from gspo_megatron.models import spec_from_hf_config
from gspo_megatron.testing.tiny_model import tiny_dense_config, tiny_glm_config, tiny_moe_config


def _counted(config, lengths) -> int:
    """FlopCounterMode's total over a forward of one sequence per length (each its own call:
    the count of a padded batch would include the padding)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    total = 0
    for n in lengths:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=torch.randint(0, config.vocab_size, (1, n)))
        total += counter.get_total_flops()
    return total


@pytest.mark.parametrize("make_config", [tiny_dense_config, tiny_moe_config, tiny_glm_config])
def test_forward_flops_equal_pytorchs_count(make_config):
    """GLM's count holds its dense first layer, the router (in fp32), top-2 of 8 experts and the
    shared expert."""
    config = make_config()
    spec = spec_from_hf_config(config.to_dict())
    lengths = [5, 17, 33]
    assert forward_flops(spec, lengths) == _counted(config, lengths)
    assert train_flops(spec, lengths) == 3 * forward_flops(spec, lengths)


def test_moe_flops_count_the_routed_experts_only():
    """top_k of num_experts experts per token: doubling the experts adds router work only."""
    few = spec_from_hf_config(tiny_moe_config().to_dict())
    many = spec_from_hf_config(tiny_moe_config(num_local_experts=8).to_dict())
    tokens, layers = 10, sum(few.moe_layers)
    extra_router = tokens * layers * 2 * few.hidden_size * (many.num_experts - few.num_experts)
    assert forward_flops(many, [tokens]) - forward_flops(few, [tokens]) == extra_router


def test_peaks_by_device_name():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA L40") == 181.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.1
    assert peak_bf16_tflops("Some Future Card") is None
