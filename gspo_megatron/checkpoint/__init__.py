"""Checkpoints: everything that reads or writes model and training state on disk.

- ``model``: a megatron-core distributed checkpoint (``torch_dist``) as a model: which model it
  holds (its ``hf/config.json``), whether its files are all there (against its metadata), and
  loading it into a model built in any parallel layout;
- ``training``: training checkpoints (model, optimizer, scheduler, RNG, step) saved atomically
  and loaded; ``optimizer_state``: the distributed optimizer's part of them; ``run_dir``: which
  checkpoints a run's directory holds, the one a resume continues from, pruning;
- ``atomic``: outputs written under a temporary name and renamed when complete, free-space
  checks, leftovers of killed writers;
- ``dcp_io`` / ``safetensors_io``: the two formats, streamed one tensor at a time;
- ``hf_to_mcore`` / ``mcore_to_hf``: conversion both ways. ``gspo-convert``
  (``checkpoints_convert``) is their command line; the trainer's HF export and the demo call
  them directly.
"""
