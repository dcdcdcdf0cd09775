"""Distributed and platform code: parallel layouts and process groups (``parallel``), the
torchrun environment (``torchrun``), small object exchanges (``exchange``), and what megatron-core
needs to run and run fast without CUDA (``cpu_compat``, ``cpu_perf``)."""
