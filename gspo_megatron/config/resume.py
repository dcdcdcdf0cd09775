"""What a resume may change, decided per config key before anything heavy runs.

A resumed run continues from a checkpoint, and the checkpoint holds the config of the run that
wrote it (``step_N/config.yaml``; for checkpoints written before that file existed,
``train.output_dir/config.yaml``). The pre-flight compares the new config with it key by key:

- **refused**, one line naming the key and why: the settings the checkpoint's state is bound to
  (``REFUSED``), a parallel layout other than the saved one when the checkpoint's optimizer state
  is bound to its layout (``train.reshardable_checkpoints: false``), and ``train.steps`` below
  the step reached (a run cannot be trained backwards); ``train.steps`` equal to it is a
  complete run, which gspo-train reports and leaves as it is (exit 0: a requeued job that
  always passes --resume ends cleanly once its run is done);
- **applied** from the next step, every other key, each printed as ``resume: key: old -> new``:
  the parallel layout and the number of ranks (the checkpoint reshards on load), the learning
  rate schedule and Adam's hyper-parameters (the optimizer and scheduler keep the config's
  values, not the checkpoint's), data, rewards, sampling, the objective, checkpointing.

``train.output_dir/config.yaml`` is the config the run was started with and is never rewritten;
a resume that changed something writes ``config.resume-K.yaml`` beside it (K = 1, 2, ...), its
first line saying at which step and what changed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from gspo_megatron.checkpoint.atomic import atomic_write_text
from gspo_megatron.checkpoint.optimizer_state import DP_RESHARDABLE
from gspo_megatron.checkpoint.run_dir import CONFIG_FILE, read_trainer_state
from gspo_megatron.config.io import to_dict
from gspo_megatron.errors import GspoError

REFUSED = {
    "model.dtype": "the optimizer's master weights and Adam moments are those of the run's "
    "parameter dtype",
    "optim.use_distributed_optimizer": "the optimizer state is saved in that optimizer's own "
    "format",
    "optim.cpu_offload_fraction": "the offloaded optimizer's state is split by that fraction",
    "train.seed": "the run's random generators are restored from the checkpoint, so a new seed "
    "would not take effect",
}
"""Keys a resume may not change, and why."""

LAYOUT_KEYS = ("parallel.tp", "parallel.pp", "parallel.ep", "parallel.etp", "parallel.cp")
LAYOUT_KEYS += ("parallel.pp_layers",)
"""The model-parallel split, which only a layout-free (reshardable) optimizer state survives."""
BUCKET_KEYS = ("optim.overlap_grad_reduce", "optim.grad_bucket_elements")
"""What sets the gradient buckets, whose flat buffers a per-shard optimizer state is saved in."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}: sections into dotted keys (lists and other
    values are leaves)."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def saved_config(checkpoint: Path, output_dir: Path) -> Optional[Dict[str, Any]]:
    """The config the checkpoint was trained with: its own ``config.yaml``, else (checkpoints
    that predate it) the run's, else None (nothing to compare with)."""
    for path in (Path(checkpoint) / CONFIG_FILE, Path(output_dir) / CONFIG_FILE):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as err:
                raise GspoError(f"{path}: the run's saved config cannot be read ({err})") from None
            return data if isinstance(data, dict) else None
    return None


def resume_changes(cfg, checkpoint: Path) -> List[Change]:
    """The keys of ``cfg`` that differ from the config ``checkpoint`` was trained with, each
    allowed (returned, to be printed) or refused (GspoError, the first one)."""
    step = int(read_trainer_state(checkpoint).get("step", -1))
    if 0 <= step and cfg.train.steps < step:
        raise GspoError(
            f"train.steps={cfg.train.steps}: the run has done {step} steps already "
            f"({checkpoint}); raise train.steps to continue it"
        )
    saved = saved_config(checkpoint, Path(cfg.train.output_dir))
    if saved is None:
        return []
    old, new = flatten(saved), flatten(to_dict(cfg))
    changes = [Change(k, old[k], v) for k, v in new.items() if k in old and old[k] != v]
    optimizer_format = read_trainer_state(checkpoint).get("optimizer_format", DP_RESHARDABLE)
    for change in changes:
        if change.key in REFUSED:
            raise GspoError(
                f"{change.key}={_show(change.new)} on resume: the run was trained with "
                f"{_show(change.old)} and {REFUSED[change.key]}; resume with "
                f"{change.key}={_show(change.old)} or start a new run"
            )
        if change.key in LAYOUT_KEYS and optimizer_format == DP_RESHARDABLE:
            raise GspoError(
                f"{change.key}={_show(change.new)} on resume: {checkpoint} stores the optimizer "
                f"state per data-parallel shard (train.reshardable_checkpoints: false, or a "
                f"checkpoint older than that setting), which only its own model-parallel layout "
                f"can load ({change.key}={_show(change.old)}); only the number of data-parallel "
                f"ranks may change"
            )
        if change.key in BUCKET_KEYS and optimizer_format == DP_RESHARDABLE:
            raise GspoError(
                f"{change.key}={_show(change.new)} on resume: {checkpoint} stores the optimizer "
                f"state per data-parallel shard in megatron's gradient buckets, which this "
                f"setting lays out; resume with {change.key}={_show(change.old)} (or save "
                f"reshardable checkpoints, train.reshardable_checkpoints: true)"
            )
    return changes


def config_text(cfg) -> str:
    """The resolved config as YAML: what the run directory and every checkpoint keep."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def record_config(out: Path, text: str, changes: List[Change], step: int) -> Optional[Path]:
    """Keep the config (``text``, ``config_text``) a run starts with: ``config.yaml`` on its
    first start (never rewritten afterwards), and on a resume that changed something
    ``config.resume-K.yaml``. Returns the file written (None: nothing new to keep)."""
    out = Path(out)
    first = out / CONFIG_FILE
    if not first.exists():
        atomic_write_text(first, text)
        return first
    if not changes:
        return None
    k = 1
    while (out / f"config.resume-{k}.yaml").exists():
        k += 1
    when = datetime.datetime.now().isoformat(timespec="seconds")
    header = f"# resumed at step {step} ({when}); changed: " + "; ".join(map(str, changes))
    path = out / f"config.resume-{k}.yaml"
    atomic_write_text(path, header + "\n" + text)
    return path
