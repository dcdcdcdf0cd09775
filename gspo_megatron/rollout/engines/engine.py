"""vLLM rollout engines colocated with the trainer, one per ``engine_tp`` consecutive ranks.

Placement: every training rank runs vLLM in its own process (vLLM's ``external_launcher``
executor, in-process, no extra workers), so the engine shares the trainer's torch.distributed
world and the weight sync is an in-memory copy. vLLM splits that world into engines of
``engine_tp`` consecutive ranks; on CPU and for models that fit one GPU the default
``engine_tp=1`` gives one engine per rank, the most rollout throughput. All tensor-parallel
ranks of an engine must see the same requests in the same order, so every rank receives the
whole prompt list and an engine serves prompts ``i`` with ``i % num_engines == engine_index``;
results are then shared with every rank. Sampling seeds depend on (seed, step, prompt index)
only, so a rollout does not depend on the number of engines.

On GPU the engine sleeps while the trainer runs (weights and KV cache freed) and wakes for the
weight sync and rollouts. vLLM's CPU backend has no sleep mode; there both stay resident.

vLLM's log-probs are the raw (untempered) log-softmax of the sampled tokens, the quantity the
trainer computes, so the two can be compared token by token.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gspo_megatron.distributed.exchange import all_gather_objects
from gspo_megatron.errors import GspoError
from gspo_megatron.models import spec_from_hf_config
from gspo_megatron.rollout.config import RolloutConfig
from gspo_megatron.rollout.engines.cpu_reload import keeping_linear_weights, reload_in_place
from gspo_megatron.rollout.engines.kv_cache import block_bytes, waves_note
from gspo_megatron.rollout.engines.routes import RouteCapture
from gspo_megatron.rollout.engines.weight_sync import SyncStats
from gspo_megatron.rollout.types import Completion, RolloutBatch

CPU_BATCHED_TOKENS = 2048
"""CPU: tokens vLLM schedules per engine step at least (its default), whole prompts only."""


def _eager():
    return torch.compiler.set_stance("force_eager")


def _quiet_vllm() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    # The engine runs in this process; external_launcher requires it anyway.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _launcher_env() -> None:
    """external_launcher reads the torchrun variables; a single process started without torchrun
    (already holding a one-rank torch.distributed group) gets their one-rank values."""
    if not dist.is_initialized():
        raise GspoError(
            "the rollout engine needs torch.distributed initialised first "
            "(gspo_megatron.distributed.parallel.init_distributed)"
        )
    if "RANK" not in os.environ:
        if dist.get_world_size() != 1:
            raise GspoError("RANK is not set but the world has several ranks: launch with torchrun")
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def explain_start_failure(err: BaseException, cfg: RolloutConfig, on_gpu: bool) -> str:
    """vLLM's start-up exceptions -> one line that says what to change."""
    text = " ".join(str(err).split())
    low = text.lower()
    if "kv cache" in low or "cache blocks" in low:
        knob = "rollout.gpu_memory_utilization" if on_gpu else "rollout.kv_cache_gib"
        return (
            f"vLLM cannot fit the KV cache for max_model_len={cfg.max_model_len} "
            f"(rollout.max_prompt_tokens + rollout.max_new_tokens): raise {knob} or lower "
            f"those lengths [{text[:300]}]"
        )
    if "head size" in low or "head_size" in low or "head dim" in low:
        return (
            f"vLLM's attention backend rejects this model's head_dim "
            f"(vLLM's CPU attention needs head_dim of 32, 64, 80, 96, 112, 128, 256...) "
            f"[{text[:300]}]"
        )
    return f"vLLM engine failed to start: {type(err).__name__}: {text[:400]}"


def check_model_fits(hf_dir: Path, cfg: RolloutConfig) -> None:
    """Prompt + response budget within the model's positions (vLLM would refuse to start)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    limit = config.get("max_position_embeddings")
    if limit is not None and cfg.max_model_len > limit:
        raise GspoError(
            f"rollout.max_prompt_tokens + rollout.max_new_tokens = {cfg.max_model_len} "
            f"exceeds the model's max_position_embeddings={limit} ({hf_dir})"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if not torch.cuda.is_available():
        # vLLM's CPU attention fails on other sizes only at the first forward pass. (vLLM is
        # imported where it is used throughout: seconds of imports, needed only by the engine.)
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise GspoError(
                f"{hf_dir}: head_dim={head_dim} is not supported by vLLM's CPU "
                f"attention (supported: {', '.join(map(str, sizes))})"
            )


class RolloutEngine:
    """A vLLM engine on this rank's engine group; every rank constructs one (collectively)."""

    def __init__(
        self,
        hf_dir: Path,
        cfg: RolloutConfig,
        dtype: torch.dtype = torch.float32,
        dummy_weights: bool = False,
        capture_routes: bool = False,
    ):
        """``dummy_weights``: start from random weights without reading any from ``hf_dir``
        (which then needs only config and tokenizer); the trainer syncs its own in before the
        first rollout. ``capture_routes``: record the experts each MoE layer routes every token
        to (``Completion.routes``; no-op for a dense model). It turns prefix caching off and, on
        GPU, selects vLLM's V1 runner in eager mode (``rollout.routes`` says why)."""
        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise GspoError(
                f"{hf_dir}: no config.json; the rollout engine needs an HF model "
                f"directory (gspo-convert mcore-to-hf writes one)"
            )
        _launcher_env()
        world = dist.get_world_size()  # the engines' ranks (all, or the rollout ranks)
        cfg.validate_values()
        if world % cfg.engine_tp:
            raise GspoError(f"rollout.engine_tp={cfg.engine_tp}: must divide {world} ranks")
        check_model_fits(hf_dir, cfg)
        self.cfg, self.hf_dir = cfg, hf_dir
        self.on_gpu = torch.cuda.is_available()
        self.rank = dist.get_rank()
        self.engine_index = self.rank // cfg.engine_tp
        self.num_engines = world // cfg.engine_tp
        self.asleep = False
        _quiet_vllm()
        try:
            from vllm import LLM
        except ImportError as err:
            raise GspoError(
                f"vLLM is not installed ({err}); on CPU run launch/setup.sh, on GPU "
                f"pip install vllm"
            ) from None
        kwargs = dict(
            model=str(hf_dir),
            tokenizer=str(hf_dir),
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=cfg.engine_tp,
            distributed_executor_backend="external_launcher",
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            seed=cfg.seed,
            logprobs_mode="raw_logprobs",
            max_logprobs=1,
            enforce_eager=cfg.enforce_eager or not self.on_gpu,
        )
        config = json.loads((hf_dir / "config.json").read_text())
        self.hf_config, self.dtype = config, dtype
        # The family's spec names the routed experts (Qwen3: num_experts; GLM: n_routed_experts).
        spec = spec_from_hf_config(config, str(hf_dir / "config.json"))
        capture_routes = capture_routes and spec.is_moe
        if capture_routes:
            kwargs.update(enable_prefix_caching=False, enforce_eager=True)
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if dummy_weights:
            kwargs["load_format"] = "dummy"
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_sleep_mode=cfg.sleep_during_training,
            )
        else:
            # An explicit size: vLLM's CPU default (a fraction of host RAM) is far too large
            # next to a trainer, and it lets vLLM skip its warm-up.
            kwargs.update(kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)))
            # No prefill split over engine steps: vLLM rewinds a seeded request's generator after
            # a partial prefill (its sampled token is discarded), which CPU generators cannot do
            # ("CPU Generator does not use offset"): long prompts, e.g. multi-turn transcripts,
            # would end the run. Whole prefills, at least one full-length prompt per step.
            kwargs.update(
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(cfg.max_model_len, CPU_BATCHED_TOKENS),
            )
        t0 = time.perf_counter()
        # CPU: linear layers keep their weight for the in-place sync (rollout.cpu_reload).
        keep = contextlib.nullcontext() if self.on_gpu else keeping_linear_weights()
        try:
            with keep:
                self.llm = LLM(**kwargs)
        except Exception as err:  # vLLM raises plain ValueError/RuntimeError at start-up
            raise GspoError(explain_start_failure(err, cfg, self.on_gpu)) from err
        self.start_seconds = time.perf_counter() - t0
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self.routes = (
            RouteCapture(self._model_runner(), spec.num_experts, spec.moe_top_k)
            if capture_routes
            else None
        )

    def waves_note(self, prompts_per_step: int) -> Optional[str]:
        """One line when a step's sequences do not all fit in this engine's KV cache at once
        (``rollout.kv_cache``), None when they do."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        per_engine = math.ceil(prompts_per_step / self.num_engines) * self.cfg.group_size
        spec = spec_from_hf_config(self.hf_config, str(self.hf_dir / "config.json"))
        nbytes = block_bytes(spec, self.dtype.itemsize, self.cfg.engine_tp, cache.block_size)
        return waves_note(
            per_engine,
            self.cfg.max_model_len,
            cache.num_gpu_blocks,
            cache.block_size,
            nbytes,
            self.on_gpu,
        )

    # -- sampling ----------------------------------------------------------------------------

    def _seed(self, step: int, index: int, round_: int = 0, stream: str = "") -> int:
        # Round 0 keeps the key it always had: dynamic sampling off samples what it always did.
        key = (
            f"{self.cfg.seed}/{step}/{index}"
            if round_ == 0
            else f"{self.cfg.seed}/{step}/r{round_}/{index}"
        )
        if stream:  # evaluation's own seeds, apart from the training rollouts'
            key = f"{stream}/{key}"
        return zlib.crc32(key.encode()) & 0x7FFFFFFF

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        step: int = 0,
        n: Optional[int] = None,
        greedy: bool = False,
        max_new_tokens: Optional[int] = None,
        round_: int = 0,
        stream: str = "",
    ) -> RolloutBatch:
        """Sample ``n`` (default ``group_size``) responses per prompt. Collective: every rank
        passes the same prompts and gets the same result. The sampling seeds depend on (rollout
        seed, ``step``, ``round_`` (dynamic sampling's extra rounds), prompt index) only;
        ``stream`` (e.g. "eval") keys a sequence of seeds apart from the training rollouts'."""
        from vllm import SamplingParams

        cfg = self.cfg
        n = 1 if greedy else (n or cfg.group_size)
        t0 = time.perf_counter()
        groups: List[Optional[List[Completion]]] = [None] * len(prompts)
        valid, overlong, empty = [], 0, 0
        for i, p in enumerate(prompts):
            if len(p) == 0:
                empty += 1
            elif len(p) > cfg.max_prompt_tokens:
                overlong += 1
            else:
                valid.append(i)
        mine = [i for k, i in enumerate(valid) if k % self.num_engines == self.engine_index]
        requests = [{"prompt_token_ids": list(prompts[i])} for i in mine]
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else cfg.temperature,
                top_p=1.0 if greedy else cfg.top_p,
                top_k=0 if greedy else cfg.top_k,
                max_tokens=max_new_tokens or cfg.max_new_tokens,
                logprobs=0,
                seed=None if greedy else self._seed(step, i, round_, stream),
                detokenize=False,
            )
            for i in mine
        ]
        local: Dict[int, List[Completion]] = {}
        if self.routes is not None:
            self.routes.begin()
        if requests:
            # On CPU vLLM's engine runs eagerly (enforce_eager) except for a few small helpers
            # it wraps in torch.compile (the sampled token's rank): compiling those cost the
            # first rollout 3 s for nothing measurable after. Same ops, same values.
            stance = contextlib.nullcontext() if self.on_gpu else _eager()
            with stance:
                outs = self.llm.generate(requests, params, use_tqdm=False)
            for i, out in zip(mine, outs):
                local[i] = [
                    Completion(list(c.token_ids), _sampled_logprobs(c), c.finish_reason or "")
                    for c in out.outputs
                ]
                if self.routes is not None:
                    for c in local[i]:
                        c.routes = self.routes.routes_of(prompts[i], c.token_ids)
        for i, comps in self._share(local).items():
            groups[i] = comps
        batch = RolloutBatch(
            groups, skipped_overlong=overlong, skipped_empty=empty, seconds=time.perf_counter() - t0
        )
        batch.stats = batch.summary()
        return batch

    def sample_turns(
        self,
        requests: Sequence[Tuple[int, Sequence[int], int, str]],
        stop_token_id: Optional[int],
        greedy: bool = False,
    ) -> Dict[int, "Completion"]:
        """One response per request (episode index, token prompt, max new tokens, seed key),
        stopping at ``stop_token_id`` (included in the ids; None: at EOS only): a turn of every
        live multi-turn episode, or the continuations of a partial rollout. Collective like
        ``generate``; an episode is served by engine ``index % num_engines`` whatever else is
        live, so its environment stays on one rank."""
        from vllm import SamplingParams

        cfg = self.cfg
        mine = [r for r in requests if r[0] % self.num_engines == self.engine_index]
        local: Dict[int, Completion] = {}
        if mine:
            params = [
                SamplingParams(
                    n=1,
                    temperature=0.0 if greedy else cfg.temperature,
                    top_p=1.0 if greedy else cfg.top_p,
                    top_k=0 if greedy else cfg.top_k,
                    max_tokens=max_tokens,
                    logprobs=0,
                    seed=None if greedy else zlib.crc32(f"{cfg.seed}/{key}".encode()) & 0x7FFFFFFF,
                    stop_token_ids=None if stop_token_id is None else [stop_token_id],
                    detokenize=False,
                )
                for _, _, max_tokens, key in mine
            ]
            stance = contextlib.nullcontext() if self.on_gpu else _eager()
            with stance:
                outs = self.llm.generate(
                    [{"prompt_token_ids": list(r[1])} for r in mine], params, use_tqdm=False
                )
            for r, out in zip(mine, outs):
                c = out.outputs[0]
                local[r[0]] = Completion(
                    list(c.token_ids), _sampled_logprobs(c), c.finish_reason or ""
                )
        return self._share(local)

    def _share(self, local: Dict[int, object]) -> Dict[int, object]:
        """Every engine's {prompt index: result}, merged, on every rank. TP ranks of one engine
        hold the same results: its first rank publishes them."""
        merged: Dict[int, object] = {}
        for part in all_gather_objects(local if self.rank % self.cfg.engine_tp == 0 else {}):
            merged.update(part)
        return merged

    # -- weights and memory ------------------------------------------------------------------

    def _model_runner(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        except AttributeError as err:
            raise RuntimeError(
                f"this vLLM version does not expose the in-process model runner "
                f"the weight sync uses ({err})"
            ) from None

    def load_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place from HF-named full tensors (consumed lazily;
        collective when the iterator is, as the weight gatherer's is)."""
        runner = self._model_runner()
        if self.on_gpu:
            runner.reload_weights(weights_iterator=iter(named_tensors))
        else:
            reload_in_place(runner, iter(named_tensors))
        if self.routes is not None:
            self.routes.bind()
        # Cached prompt KV was computed with the old weights.
        self.llm.reset_prefix_cache()

    def load_from(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> float:
        """Wake, load these HF-named tensors in place, wake the KV cache; returns seconds."""
        t0 = time.perf_counter()
        self.wake_weights()
        self.load_weights(named_tensors)
        if self.on_gpu:
            torch.cuda.synchronize()
        self.wake_kv_cache()
        return time.perf_counter() - t0

    def sync_from(self, gatherer) -> "SyncStats":
        """Push the trainer's current weights (a ``WeightGatherer``) into the engine; returns the
        seconds and bytes of the sync. Collective."""
        seconds = self.load_from(gatherer)
        stats = gatherer.stats
        stats.seconds = seconds
        return stats

    def close(self) -> None:
        """Shut the engine down. vLLM's teardown destroys the torch.distributed world it shares
        with the trainer, so call this last, right before the process ends (after any
        checkpoint is written); without it, vLLM's exit hook fails on the already-destroyed
        groups."""
        core = getattr(getattr(self, "llm", None), "llm_engine", None)
        if core is not None:
            core.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Free the engine's GPU memory for training (no-op on CPU)."""
        if self.on_gpu and self.cfg.sleep_during_training and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_weights(self) -> None:
        """Re-allocate weight memory before a sync (contents arrive with the sync)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])

    def wake_kv_cache(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


def _sampled_logprobs(completion) -> List[float]:
    if completion.logprobs is None:
        return []
    return [d[t].logprob for t, d in zip(completion.token_ids, completion.logprobs)]
