"""Peak memory and time of token log-probs (+ entropy), forward and backward, side by side:
this project's chunked vocab-parallel computation against the naive full-vocabulary fp32
log_softmax most trainers use.

    python tools/bench_logprobs.py [--vocab 151936 --tokens 1024,4096,16384 --dtype bf16]

naive:   logp_all = log_softmax(logits.float()); logp = logp_all.gather(targets);
         entropy = -(logp_all.exp() * logp_all).sum(-1)
chunked: gspo_megatron.learner.logprobs.vocab_parallel_logprobs (default chunking, gradient written
         into the logits' storage), as the trainer calls it.

Each case runs in a fresh process. The logits ([tokens, vocab], --dtype) exist before the
measurement starts and are not counted; "peak" is what the computation adds on top, forward and
backward (a gradient of the logits is produced in both). On CUDA peaks come from the allocator;
on CPU from the process's resident memory, sampled every millisecond. Times are the best of --repeats fwd+bwd runs. A naive case
that would not fit in memory is reported as such instead of run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch

GiB = 1024**3


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _RssSampler:
    """Highest resident set size seen by a 1 ms sampling thread (CPU runs)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak - self.base


def run_case(method: str, tokens: int, vocab: int, dtype: str, repeats: int) -> dict:
    from gspo_megatron.learner.logprobs import vocab_parallel_logprobs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=dt, device=dev)
    for lo in range(0, tokens, 256):  # fill in chunks: no fp32 temporary of the full size
        logits[lo : lo + 256] = (
            torch.randn(min(256, tokens - lo), vocab, generator=g, device=dev) * 3
        ).to(dt)
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    weights = torch.randn(tokens, generator=g, device=dev)

    def step():
        x = logits.detach().requires_grad_(True)
        if method == "naive":
            logp_all = torch.log_softmax(x.float(), dim=-1)
            logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logp, entropy = vocab_parallel_logprobs(x, targets, vocab, inplace_backward=True)
        (logp * weights).sum().backward()
        _ = entropy.detach()
        return x.grad

    _sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        sampler = _RssSampler()
        step()
        peak = sampler.stop()
    times = []
    for _ in range(repeats):
        logits_backup = logits.clone() if method == "chunked" else None  # in-place gradient
        start = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - start)
        if logits_backup is not None:
            logits.copy_(logits_backup)
            del logits_backup
    return {"peak_bytes": peak, "seconds": min(times)}


def _naive_need(tokens: int, vocab: int) -> int:
    # fp32 copy, log_softmax output, exp for the entropy, fp32 gradient (2x): 5 fp32 copies.
    return 5 * 4 * tokens * vocab


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()

    if args.case:
        method, tokens = args.case.split(":")
        print(json.dumps(run_case(method, int(tokens), args.vocab, args.dtype, args.repeats)))
        return

    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        where = torch.cuda.get_device_name()
    else:
        import psutil

        free = psutil.virtual_memory().available
        where = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(
        f"{where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; vocab {args.vocab}, "
        f"logits {args.dtype}; peak = memory added by fwd+bwd beyond the logits\n"
    )
    print(
        f"{'tokens':>7} {'naive peak':>11} {'chunked peak':>13} {'mem ratio':>10} "
        f"{'naive s':>8} {'chunked s':>10} {'time ratio':>11}"
    )
    for tokens in [int(t) for t in args.tokens.split(",")]:
        results = {}
        for method in ("naive", "chunked"):
            logits_bytes = tokens * args.vocab * (2 if args.dtype == "bf16" else 4)
            if (
                method == "naive"
                and _naive_need(tokens, args.vocab) + 2 * logits_bytes > 0.9 * free
            ):
                results[method] = None
                continue
            proc = subprocess.run(
                [
                    sys.executable,
                    "-W",
                    "ignore",
                    __file__,
                    "--case",
                    f"{method}:{tokens}",
                    "--vocab",
                    str(args.vocab),
                    "--dtype",
                    args.dtype,
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        n, c = results["naive"], results["chunked"]
        if n is None:
            need = (_naive_need(tokens, args.vocab)) / GiB
            print(
                f"{tokens:>7} {'> free':>11} {c['peak_bytes'] / GiB:12.2f}G {'-':>10} {'-':>8} "
                f"{c['seconds']:10.2f} {'-':>11}   (naive needs ~{need:.0f} GiB more than is free)"
            )
            continue
        print(
            f"{tokens:>7} {n['peak_bytes'] / GiB:10.2f}G {c['peak_bytes'] / GiB:12.2f}G "
            f"{n['peak_bytes'] / max(c['peak_bytes'], 1):9.1f}x {n['seconds']:8.2f} {c['seconds']:10.2f} "
            f"{c['seconds'] / n['seconds']:10.2f}x"
        )


if __name__ == "__main__":
    main()
