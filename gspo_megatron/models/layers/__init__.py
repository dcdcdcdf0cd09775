"""Layers the families share: megatron-core's local spec made exact and lean on CPU (RMSNorm with
sequence parallelism, attention per packed sequence and under context parallelism, experts on
their own weights, RoPE as one autograd node), the megatron config and block spec of a GPT-style
decoder, and the HF <-> megatron tensor-mapping vocabulary. Family packages build on these and
import nothing of each other."""
