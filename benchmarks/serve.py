"""The prediction service under load, with and without dynamic batching: a closed-loop load
generator (aiohttp, one request = one SST-2 sentence) at concurrency 1, 8 and 32 against one
replica of the MiniLM SST-2 model on a local Ray with Ray Serve, over real HTTP.

    python benchmarks/serve.py                        # 1 replica, 1 torch thread, 10 s per level
    python benchmarks/serve.py --threads 2 --seconds 20 --model runs/finetune/models/<row>/sst2

Prints p50 / p99 latency and requests/s per concurrency and mode, and checks the targets: at
concurrency 32, batching gives >= 3x the requests/s of batching off, and its p99 stays within
3x the p50 at concurrency 1 plus the batch wait timeout. Writes JSON.

Before the service starts, the inner loop alone (in this process, no HTTP, the replica's threads)
times a batch of one sentence and a batch of `--max-batch-size`: the most batching can give on
this machine, whatever the HTTP path costs. Its per-sentence cost at batch 1 over that at the full
batch bounds the speedup; and a closed loop of N clients waits at least one full batch's time, so
the p99 bound is within reach only where a full batch costs less than 3 batches of one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def load(url: str, texts: list[str], concurrency: int, seconds: float, warmup_s: float) -> dict:
    """`concurrency` clients, each sending its next request when its answer arrives, for
    `warmup_s` (not counted) then `seconds`."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

    async def client(k: int, session) -> None:
        nonlocal errors
        i = k
        while (now := time.perf_counter()) < stop_at:
            async with session.post(url, json={"texts": [texts[i % len(texts)]]}) as answer:
                await answer.read()
                ok = answer.status == 200
            done = time.perf_counter()
            if now >= measure_from:
                latencies.append(done - now)
                errors += not ok
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / seconds, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99)}


def inner_loop_ceiling(model: str, texts: list[str], batch: int, threads: int, rounds: int = 3) -> dict:
    """Milliseconds of the inner loop per call on one sentence and on `batch` sentences, over the same
    `4 * batch` texts (fastest of `rounds`), and what they allow: the speedup batching can give at
    most, and a full batch's cost in single sentences (a request at concurrency `batch` waits at
    least one batch)."""
    from predict import fastest_interleaved   # beside this script

    from bertray.predict.inference import classify
    from bertray.predict.model import load_model

    loaded = load_model(model, device="cpu", threads=threads)
    chosen = texts[:4 * batch]
    calls = [chosen[i:i + batch] for i in range(0, len(chosen), batch)]
    contenders = {"single": lambda: [classify(loaded, [text]) for text in chosen],
                  "full": lambda: [classify(loaded, call, batch_size=batch) for call in calls]}
    for run in contenders.values():            # warm-up
        run()
    seconds = fastest_interleaved(contenders, rounds)
    single, full = seconds["single"] / len(chosen), seconds["full"] / len(calls)
    return {"batch_1_ms": 1000 * single, f"batch_{batch}_ms": 1000 * full,
            "max_speedup": seconds["single"] / seconds["full"],     # the same texts both ways
            "full_batch_over_single": full / single}


def main() -> None:
    from predict import cached_sst2_model, model_arguments, sst2_texts   # beside this script
    from report import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser, "torch threads of the replica")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from bertray.serve.app import Predictor

    model = args.model or str(cached_sst2_model(args.data, args.steps))
    texts, _ = sst2_texts(args.data)
    ceiling = inner_loop_ceiling(model, texts, args.max_batch_size, args.threads)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        for batching in (True, False):
            mode = "batching on" if batching else "batching off"
            settings = {"model": model, "batching": batching, "max_batch_size": args.max_batch_size,
                        "batch_wait_timeout_s": args.batch_wait_timeout_s, "threads": args.threads}
            app = Predictor.options(num_replicas=1, max_ongoing_requests=4 * max(CONCURRENCY),
                                    ray_actor_options={"num_cpus": min(args.threads, args.num_cpus)})
            serve.run(app.bind(settings), name="bench", route_prefix="/")
            url = f"http://127.0.0.1:{port}/predict"
            results[mode] = [asyncio.run(load(url, texts, c, args.seconds, args.warmup_s)) for c in CONCURRENCY]
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as f:
                results[mode + " stats"] = json.load(f)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    on, off = {r["concurrency"]: r for r in results["batching on"]}, {r["concurrency"]: r for r in results["batching off"]}
    speedup = on[32]["requests_per_s"] / off[32]["requests_per_s"]
    p99_limit_ms = 3 * on[1]["p50_ms"] + 1000 * args.batch_wait_timeout_s
    print(f"\nserve, MiniLM SST-2, 1 replica, {args.threads} torch thread(s), one sentence per request, "
          f"max batch {args.max_batch_size}, wait {1000 * args.batch_wait_timeout_s:g} ms, {args.seconds:g} s per level:")
    print(f"  {'mode':14s} {'concurrency':>11s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for mode in ("batching on", "batching off"):
        for r in results[mode]:
            print(f"  {mode:14s} {r['concurrency']:11d} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} "
                  f"{r['p99_ms']:8.1f} {r['errors']:7d}")
    print(f"  req/s at 32, batching on / off: {speedup:.2f}x (target >= 3x)")
    print(f"  p99 at 32 with batching {on[32]['p99_ms']:.0f} ms; limit 3 x p50 at 1 + wait = {p99_limit_ms:.0f} ms "
          f"({'met' if on[32]['p99_ms'] <= p99_limit_ms else 'missed'})")
    print(f"  the inner loop alone, no HTTP: {ceiling['batch_1_ms']:.1f} ms for 1 sentence, "
          f"{ceiling[f'batch_{args.max_batch_size}_ms']:.0f} ms for {args.max_batch_size}: batching gives at most "
          f"{ceiling['max_speedup']:.2f}x here, and a full batch costs {ceiling['full_batch_over_single']:.1f}x "
          f"one sentence (the p99 bound needs < 3x)")
    print(f"  requests per batch seen (batching on): {results['batching on stats']['requests_per_batch']}")
    for mode in ("batching on", "batching off"):
        stats = results[mode + " stats"]
        busy = stats["model_seconds"] / (len(CONCURRENCY) * (args.seconds + args.warmup_s))
        print(f"  {mode}: the replica's inner loop was busy {busy:.0%} of the run "
              f"({stats['model_seconds']:.1f} s for {stats['requests']} requests, "
              f"{1000 * stats['model_seconds'] / max(1, stats['batches']):.1f} ms per batch)")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    report = {"model": model, "threads": args.threads, "num_cpus": args.num_cpus, "max_batch_size": args.max_batch_size,
              "batch_wait_timeout_s": args.batch_wait_timeout_s, "seconds": args.seconds, "results": results,
              "speedup_at_32": speedup, "inner_loop_ceiling": ceiling, "p99_limit_ms": p99_limit_ms,
              "load_average": os.getloadavg()}
    write_json(args.json, report)


if __name__ == "__main__":
    main()
