"""Multi-turn episodes with a slow tool: each turn's time beside the serial sum of its tool
latencies, in one run.

    python tools/bench_agent.py [--episodes 64] [--sleep 0.1]

64 episodes x 3 turns, every environment step sleeping 100 ms (``testing.sleepy_env``), on the
agent demo's tiny model (made under ``--init`` if missing) with a real vLLM engine. Per turn:
the engine call over every live episode, the environments' round (all ``step`` calls of the
turn, concurrent: one process per episode), and the serial sum a one-at-a-time loop would pay
(episodes stepped x sleep). A warm-up round first (the engine's first call, the processes'
start). Prints a table and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", type=Path, default=Path("outputs/agent_demo/init"))
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--sleep", type=float, default=0.1)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    import torch
    from transformers import AutoTokenizer

    from gspo_megatron.data import Prompt
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed, shutdown
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine
    from gspo_megatron.rollout.episodes.agent_config import AgentConfig
    from gspo_megatron.rollout.episodes.loop import agent_rollout, make_runner
    from gspo_megatron.tasks.agent_demo import prepare

    if not (args.init / "hf" / "model.safetensors").is_file():
        prepare(args.init, rows=64, warm_start_steps=10, warm_start_lr=3e-3, seed=0)
    init_distributed(ParallelLayout())
    hf = args.init / "hf"
    rollout = RolloutConfig(
        group_size=1, max_prompt_tokens=192, max_new_tokens=32, kv_cache_gib=0.1
    )
    engine = RolloutEngine(hf, rollout, torch.float32)
    agent = AgentConfig(
        environment="gspo_megatron.testing.sleepy_env:SleepyEnv",
        max_turns=3,
        max_tokens_per_turn=16,
        step_timeout_s=30,
    )
    runner = make_runner(agent, rollout, AutoTokenizer.from_pretrained(str(hf)), engine)

    def prompts(n, sleep):
        return [Prompt("go", [1], None, i, {"prompt": "go", "sleep_s": sleep}) for i in range(n)]

    agent_rollout(runner, prompts(args.episodes, 0.0), 1, step=0)  # warm-up
    batch = agent_rollout(runner, prompts(args.episodes, args.sleep), 1, step=1)
    comps = [c for g in batch.groups for c in g]
    failures = sum(c.agent.failure is not None for c in comps)
    print(
        f"bench_agent: {args.episodes} episodes x {agent.max_turns} turns, tool sleep "
        f"{args.sleep * 1000:.0f} ms; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {datetime.date.today()}; failed episodes: {failures}"
    )
    print(
        f"{'turn':>4} {'live':>5} {'engine s':>9} {'envs s':>8} {'serial tools s':>15} {'ratio':>6}"
    )
    live = args.episodes
    for k, (engine_s, env_s) in enumerate(runner.turn_seconds):
        stepped = sum(c.agent.turns > k for c in comps)
        serial = stepped * args.sleep
        print(
            f"{k + 1:>4} {stepped:>5} {engine_s:>9.3f} {env_s:>8.3f} {serial:>15.2f} {serial / env_s:>5.1f}x"
        )
        live = stepped
    total_env = sum(e for _, e in runner.turn_seconds)
    total_serial = sum(c.agent.turns for c in comps) * args.sleep
    print(
        f"all turns: environments {total_env:.2f} s against {total_serial:.1f} s serial "
        f"({total_serial / total_env:.1f}x); episode wall {runner.seconds:.2f} s; live at the end {live}"
    )
    runner.envs.close()
    engine.close()
    shutdown()


if __name__ == "__main__":
    main()
