"""Where modules moved when the package tree was re-organised (learner/, distributed/, config/,
rollout/engines|episodes|separate/, tasks/): old dotted path -> new.

Read where objects pickled by an earlier version are loaded (a checkpoint's queue of rollouts:
``rollout.source.load_queue``), and listed in the README for the ``python -m`` paths that moved.
"""

from __future__ import annotations

import io
import pickle

MOVED = {
    "gspo_megatron.agent_demo": "gspo_megatron.tasks.agent_demo",
    "gspo_megatron.batch": "gspo_megatron.learner.batch",
    "gspo_megatron.config_doc": "gspo_megatron.config.doc",
    "gspo_megatron.config_io": "gspo_megatron.config.io",
    "gspo_megatron.cpu_compat": "gspo_megatron.distributed.cpu_compat",
    "gspo_megatron.cpu_perf": "gspo_megatron.distributed.cpu_perf",
    "gspo_megatron.demo": "gspo_megatron.tasks.demo",
    "gspo_megatron.exchange": "gspo_megatron.distributed.exchange",
    "gspo_megatron.forward": "gspo_megatron.learner.forward",
    "gspo_megatron.logprobs": "gspo_megatron.learner.logprobs",
    "gspo_megatron.old_logprobs": "gspo_megatron.learner.old_logprobs",
    "gspo_megatron.optim": "gspo_megatron.learner.optim",
    "gspo_megatron.packing": "gspo_megatron.learner.packing",
    "gspo_megatron.parallel": "gspo_megatron.distributed.parallel",
    "gspo_megatron.reference": "gspo_megatron.learner.reference",
    "gspo_megatron.resume": "gspo_megatron.config.resume",
    "gspo_megatron.rollout.agent_config": "gspo_megatron.rollout.episodes.agent_config",
    "gspo_megatron.rollout.check": "gspo_megatron.rollout.engines.check",
    "gspo_megatron.rollout.cpu_reload": "gspo_megatron.rollout.engines.cpu_reload",
    "gspo_megatron.rollout.env_pool": "gspo_megatron.rollout.episodes.env_pool",
    "gspo_megatron.rollout.episodes": "gspo_megatron.rollout.episodes.loop",
    "gspo_megatron.rollout.kv_cache": "gspo_megatron.rollout.engines.kv_cache",
    "gspo_megatron.rollout.link": "gspo_megatron.rollout.separate.link",
    "gspo_megatron.rollout.placement": "gspo_megatron.rollout.separate.placement",
    "gspo_megatron.rollout.rollout_rank": "gspo_megatron.rollout.separate.rollout_rank",
    "gspo_megatron.rollout.routes": "gspo_megatron.rollout.engines.routes",
    "gspo_megatron.rollout.tool_calls": "gspo_megatron.rollout.episodes.tool_calls",
    "gspo_megatron.rollout.tool_env": "gspo_megatron.rollout.episodes.tool_env",
    "gspo_megatron.rollout.transcript": "gspo_megatron.rollout.episodes.transcript",
    "gspo_megatron.rollout.weight_sync": "gspo_megatron.rollout.engines.weight_sync",
    "gspo_megatron.route_change": "gspo_megatron.learner.route_change",
    "gspo_megatron.routing_replay": "gspo_megatron.learner.routing_replay",
    "gspo_megatron.step_metrics": "gspo_megatron.learner.step_metrics",
    "gspo_megatron.step_samples": "gspo_megatron.learner.step_samples",
    "gspo_megatron.torchrun": "gspo_megatron.distributed.torchrun",
    "gspo_megatron.update": "gspo_megatron.learner.update",
    # Completion and RolloutBatch lived in the engine module before rollout/types.py.
    "gspo_megatron.rollout.engine": "gspo_megatron.rollout.types",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return super().find_class(MOVED.get(module, module), name)


def loads(data: bytes):
    """pickle.loads, reading classes pickled under a module's old path from its new one."""
    return _Unpickler(io.BytesIO(data)).load()
