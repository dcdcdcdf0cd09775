"""The CPU rollout engine in bf16 against fp32, with this CPU's own kernels and with the kernels
an AVX-512 CPU without avx512_bf16, or an AVX2-only CPU, would run, in one run.

    python tools/bench_engine_dtype.py --hf-dir outputs/compare/init_seed0/hf [--prompts 8 --new 72]

A CPU without a feature cannot be borrowed, so its software path is forced on this one: vLLM
picks its kernel library from torch.cpu's feature probes (``vllm._C`` with avx512_bf16,
``vllm._C_AVX512`` without it, ``vllm._C_AVX2`` without AVX-512), and oneDNN (torch's bf16
matrix products) and ATen from ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY. Each case runs in a
fresh process with the probes answering as that CPU would and both caps set: the code paths
such a CPU takes, on this CPU's cores (so what is measured is the software path, not that
CPU's clock or memory).

Each case: one engine (RolloutEngine, as the trainer builds it) samples ``--prompts`` prompts x
``--group`` responses of ``--new`` tokens at most,
once to warm up and then ``--repeats`` times; the median is printed with tokens per second
(the response lengths are what the model samples: use a model whose answers are long, e.g. the
one tools/compare_objectives.py warm-starts, for a figure about decoding rather than start-up). A
case that fails to start or sample is printed with its error: that is the answer for that CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# kernels -> (what the probes answer: avx512, avx512_bf16), ONEDNN_MAX_CPU_ISA, ATen capability
KERNELS = {
    "native": (None, None, None),
    "avx512 without bf16": ((True, False), "AVX512_CORE", "avx512"),
    "avx2": ((False, False), "AVX2", "avx2"),
}


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=72, help="most tokens per response")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # "kernels|dtype": run one case, print JSON
    return ap.parse_args(argv)


def run_case(args) -> dict:
    """In a fresh process: the feature probes answer as ``kernels``' CPU, then the engine runs."""
    kernels, dtype_name = args.case.split("|")
    probes = KERNELS[kernels][0]
    import torch

    if probes is not None:
        torch.cpu._is_avx512_supported = lambda: probes[0]
        torch.cpu._is_avx512_bf16_supported = lambda: probes[1]
    import torch.distributed as dist

    from gspo_megatron.distributed.parallel import free_port
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = RolloutConfig(
        group_size=args.group,
        max_prompt_tokens=72,
        max_new_tokens=args.new,
        kv_cache_gib=0.25,
    )
    try:
        engine = RolloutEngine(args.hf_dir, cfg, dtype=dtype)
        # Copy-task prompts (64 words w1..w8, then the separator w0; word wN is token N): the
        # demo models answer them with up to 64 words.
        prompts = [[1 + (i * 7 + j * 3) % 8 for j in range(64)] + [0] for i in range(args.prompts)]
        engine.generate(prompts, step=0)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            batch = engine.generate(prompts, step=1 + r)
            times.append(time.perf_counter() - t0)
    except Exception as err:  # the answer for this CPU: printed, not raised
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    # vLLM's x86 kernel libraries fail to register as modules when imported under another name
    # (vllm/platforms/cpu.py ignores that): which one is mapped into the process says it.
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    loaded = sorted(
        {Path(x.split()[-1]).name.split(".")[0] for x in maps.splitlines() if "/vllm/_C" in x}
    )
    return {
        "seconds": statistics.median(times),
        "tokens": batch.num_tokens,
        "vllm_kernels": ",".join(loaded) or "?",
        "aten": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return
    if not (args.hf_dir / "config.json").is_file():
        sys.exit(
            f"error: --hf-dir {args.hf_dir}: no config.json (e.g. tools/compare_objectives.py's init_seed0/hf)"
        )
    flags = cpu_flags()
    cases = [k for k in KERNELS if k != "avx2" or "avx2" in flags]
    cases = [k for k in cases if not k.startswith("avx512") or "avx512f" in flags]
    print(
        f"{platform.processor() or platform.machine()}, avx512f={'avx512f' in flags}, "
        f"avx512_bf16={'avx512_bf16' in flags}; {args.prompts} x {args.group} responses of "
        f"{args.new} tokens, median of {args.repeats}; {datetime.date.today()}"
    )
    print(f"{'kernels':<22}{'dtype':<7}{'seconds':>9}{'tokens/s':>10}  vLLM library / ATen")
    for kernels in cases:
        for dtype in ("fp32", "bf16"):
            _, isa, aten = KERNELS[kernels]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            if isa:
                env.update(ONEDNN_MAX_CPU_ISA=isa, ATEN_CPU_CAPABILITY=aten)
            cmd = [sys.executable, __file__, "--case", f"{kernels}|{dtype}"]
            cmd += ["--hf-dir", str(args.hf_dir), "--prompts", str(args.prompts)]
            cmd += ["--group", str(args.group), "--new", str(args.new)]
            cmd += ["--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{kernels:<22}{dtype:<7}  failed: {tail[:150]}")
                continue
            r = json.loads(lines[-1][len("RESULT ") :])
            if "error" in r:
                print(f"{kernels:<22}{dtype:<7}  failed: {r['error']}")
                continue
            rate = r["tokens"] / r["seconds"]
            print(
                f"{kernels:<22}{dtype:<7}{r['seconds']:>9.3f}{rate:>10.0f}  "
                f"{r['vllm_kernels']} / {r['aten']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
