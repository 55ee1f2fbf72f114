"""A long run as a server sees it: 1 000+ prompts of distinct layouts through one model, memory and latency.

A random-weight Qwen2-VL-architecture language model (``--hidden 256 --layers 4 --heads 8 --kv-heads 2``) gets
``--prompts`` prompts of 1-6 images of 16-600 tokens each with text between them (~130-2 400 tokens, every
layout different), through each path with default options: ``attach`` (eager) and the compiled model
(``torch.compile(lm, backend=blindsight_backend(profile))``, its compiles included in its first prompts). Every
``--every`` prompts it prints the process's RSS and what the caches hold (``blindsight.cache_info()``); at the
end the p50/p99 latency per prompt (after the first ``--every``, so compiles are left out) and the sparse fraction.

``--threads N`` instead shares one cold compiled model between N threads, each with its own prompts, and reports
how many of the image calls ran sparse (with Dynamo's recompile limit per thread, most ran dense).

    python bench/soak.py [--prompts 1000] [--every 100] [--paths attach,compiled] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time

import torch
from stream import build

import blindsight
from blindsight import Category, Profile, blindsight_backend


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        ids = []
        for _ in range(rng.randint(1, 6)):
            ids += [rng.randint(10, 999) for _ in range(rng.randint(4, 60))]
            ids += [1002] + [1000] * rng.randint(14, 598) + [1003]
        ids += [rng.randint(10, 999) for _ in range(rng.randint(4, 60))]
        layout = tuple(i >= 1000 for i in ids)
        if layout not in seen:  # every prompt a layout of its own
            seen.add(layout)
            out.append(torch.tensor([ids]))
    return out


def mixed_profile(model) -> Profile:
    """Every category in every layer (the template from the model's config)."""
    cfg = model.config.text_config
    layers = [[Category((layer + h) % 4) for h in range(cfg.num_attention_heads)]
              for layer in range(cfg.num_hidden_layers)]
    return Profile.from_categories(layers, model)


def cache_totals() -> tuple[float, int]:
    info = blindsight.cache_info().values()
    return sum(c.bytes for c in info) / 2**20, sum(c.entries for c in info)


def run_path(name: str, model, lm, profile, prompts, every: int) -> dict:
    if name == "attach":
        blindsight.attach(model, profile)
        run = lm
    else:
        torch._dynamo.reset()
        run = torch.compile(lm, backend=blindsight_backend(profile))
    blindsight.clear_caches()
    blindsight.reset_stats()
    times, checkpoints = [], []
    try:
        with torch.no_grad():
            for i, ids in enumerate(prompts, 1):
                t = time.perf_counter()
                run(input_ids=ids)
                times.append(time.perf_counter() - t)
                if i % every == 0:
                    mb, entries = cache_totals()
                    checkpoints.append({"prompts": i, "rss_mb": round(rss_mb()), "cache_mb": round(mb, 1),
                                        "cache_entries": entries})
                    print(f"  {name:8s} {i:5d} prompts  RSS {checkpoints[-1]['rss_mb']:6d} MB  caches "
                          f"{mb:7.1f} MB in {entries} entries", flush=True)
    finally:
        if name == "attach":
            blindsight.detach(model)
    warm = sorted(times[every:]) or sorted(times)
    return {"path": name, "prompts": len(prompts), "checkpoints": checkpoints,
            "p50_ms": 1000 * statistics.median(warm), "p99_ms": 1000 * warm[min(len(warm) - 1, int(0.99 * len(warm)))],
            "sparse_fraction": blindsight.sparse_fraction(), "stats": blindsight.stats()}


def run_threads(lm, profile, prompts, threads: int) -> dict:
    torch._dynamo.reset()
    clm = torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False))
    blindsight.reset_stats()
    errors = []

    def serve(t):
        try:
            with torch.no_grad():
                for ids in prompts[t::threads]:
                    clm(input_ids=ids)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(repr(e))

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    s = blindsight.stats()
    image_calls = len(prompts) * lm.config.num_hidden_layers
    return {"threads": threads, "prompts": len(prompts), "image_calls": image_calls,
            "sparse_calls": s.get("sparse_calls", 0), "seconds": time.perf_counter() - start, "errors": errors,
            "fallbacks": {k: v for k, v in s.items() if k.startswith("fallback.")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--paths", default="attach,compiled")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = build(args.hidden, args.layers, args.heads, args.kv_heads)
    lm = model.model.language_model
    profile = mixed_profile(model)
    prompts = make_prompts(args.prompts)
    lengths = [p.shape[1] for p in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, each layout distinct; "
          f"start RSS {rss_mb():.0f} MB", flush=True)
    if args.threads:
        result = run_threads(lm, profile, prompts, args.threads)
        print(f"{result['threads']} threads, one cold compiled model: {result['sparse_calls']} of "
              f"{result['image_calls']} image calls sparse, fallbacks {result['fallbacks']}, errors "
              f"{len(result['errors'])}, {result['seconds']:.1f} s")
        results = [result]
    else:
        results = [run_path(name, model, lm, profile, prompts, args.every) for name in args.paths.split(",")]
        print()
        print("| path | RSS at " + " / ".join(str(c["prompts"]) for c in results[0]["checkpoints"])
              + " prompts (MB) | caches at the end | p50 / p99 per prompt | sparse |")
        print("|---|---|---|---|---|")
        for r in results:
            last = r["checkpoints"][-1]
            print(f"| {r['path']} | {' / '.join(str(c['rss_mb']) for c in r['checkpoints'])} | "
                  f"{last['cache_mb']} MB, {last['cache_entries']} entries | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms"
                  f" | {100 * r['sparse_fraction']:.0f}% |")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
