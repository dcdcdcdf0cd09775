"""``gspo-convert``: the command line of the HF <-> megatron-core converters.

The conversions themselves are the library's (``gspo_megatron.checkpoint.hf_to_mcore`` and
``mcore_to_hf``), which the trainer's HF export and the demo use too; this package depends on
the library, never the other way round.
"""
