"""Benchmark: the ``encode`` flow against bare ``SentenceTransformer.encode`` on the same texts.

Compares, in one process with the model already loaded: bare encode; the flow with the cache
off; the flow on a cold cache (every text computed and stored); the flow on a warm cache.
Data: varied synthetic English sentences generated below (20k, or 2k with ``--quick``).
Target: flow throughput >= 0.95x bare with the cache off or cold.

    python benchmarks/bench_encode.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SUBJECTS = ["The committee", "A young engineer", "Our neighbour", "The old lighthouse keeper", "Every student",
            "The central bank", "A small startup", "The orchestra", "Her grandmother", "The research team",
            "The city council", "A stray dog", "The football club", "The night nurse", "An anonymous donor"]
VERBS = ["announced", "discovered", "repaired", "questioned", "painted", "celebrated", "postponed",
         "investigated", "recommended", "rebuilt", "sold", "described", "ignored", "measured", "planted"]
OBJECTS = ["a new bridge across the river", "the quarterly budget", "an unusual fossil", "the broken clock tower",
           "a plan to reduce traffic", "the results of the clinical trial", "three hundred apple trees",
           "the missing manuscript", "an early warning system for floods", "the recipe for rye bread",
           "a faster sorting algorithm", "the price of electricity", "the migration of swallows",
           "a concert for the hospital", "the damaged railway signal"]
TAILS = ["", "yesterday", "after a long debate", "despite the heavy rain", "for the third time this year",
         "with help from volunteers", "before anyone noticed", "to the surprise of local reporters",
         "while the market was closed", "according to a statement released on Monday"]
EXTRAS = ["It was the first time in decades.", "Critics were not convinced.", "More details will follow.",
          "The decision surprised many observers.", "Nobody expected it to take so long.", ""]


def synthetic_sentences(count: int, seed: int = 7) -> list[str]:
    """Distinct sentences of 6 to 40 words, so the cache cannot collapse them."""
    rng = random.Random(seed)
    texts = []
    for number in range(count):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]
        sentence = " ".join(part for part in parts if part) + "."
        for _ in range(rng.randint(0, 2)):
            sentence += " " + rng.choice(EXTRAS)
        texts.append(f"{sentence.strip()} (note {number})")
    return texts


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k texts instead of 20k")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of bare and cache-off flow; medians are reported"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    count = 2_000 if args.quick else 20_000

    data_dir = tempfile.mkdtemp(prefix="bench-encode-")
    os.environ["TASKSERVER_DATA_DIR"] = data_dir
    from prefect.testing.utilities import prefect_test_harness

    # Flows run as the job lane runs them (taskserver.platform.job_engine): no engine heartbeat thread.
    from taskserver.flows.heartbeats import without_engine_heartbeats

    from taskserver import encoding
    from taskserver.flows.encode import encode
    from taskserver.settings import reload_settings

    reload_settings()
    texts = synthetic_sentences(count)
    import torch

    print(f"texts: {count}, batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
    model = encoding.get_encoder()
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up: first call allocates

    # The flow reads its texts from a file, as real requests of this size must: Prefect refuses
    # flow-run parameters over 512 KB, and 20k inline texts are about 2.4 MB.
    source = os.path.join(data_dir, "inputs", "texts.jsonl")
    os.makedirs(os.path.dirname(source), exist_ok=True)
    with open(source, "w") as handle:
        handle.writelines(json.dumps({"id": str(i), "text": text}) + "\n" for i, text in enumerate(texts))

    with prefect_test_harness(server_startup_timeout=120), without_engine_heartbeats():
        encode(texts=texts[:64], use_cache=False, output="outputs/warmup.npz")  # warm-up: first flow run
        bare_times, flow_times = [], []
        for _ in range(args.repeats):
            seconds, bare = timed(lambda: model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True))
            bare_times.append(seconds)
            seconds, summary = timed(
                lambda: encode(input_path=source, use_cache=False, batch_size=args.batch_size, output="outputs/off.npz")
            )
            flow_times.append(seconds)
        cold_seconds, cold = timed(lambda: encode(input_path=source, batch_size=args.batch_size, output="outputs/cold.npz"))
        warm_seconds, warm = timed(lambda: encode(input_path=source, batch_size=args.batch_size, output="outputs/warm.npz"))

    import numpy as np

    same = np.array_equal(encoding.load_embeddings("outputs/off.npz").vectors, bare)
    assert cold["encoded"] == count and warm["cache_hits"] == count, (cold, warm)
    bare_best, flow_best = statistics.median(bare_times), statistics.median(flow_times)
    rows = [
        ("bare SentenceTransformer.encode", bare_best, ""),
        ("encode flow, cache off", flow_best, f"{bare_best / flow_best:.3f}x"),
        ("encode flow, cold cache", cold_seconds, f"{bare_best / cold_seconds:.3f}x"),
        ("encode flow, warm cache", warm_seconds, f"{bare_best / warm_seconds:.3f}x"),
    ]
    print(f"{'run':34} {'seconds':>8} {'texts/s':>9} {'flow/bare':>10}")
    for name, seconds, ratio in rows:
        print(f"{name:34} {seconds:8.2f} {count / seconds:9.0f} {ratio:>10}")
    print(f"all runs (s): bare {[round(t, 2) for t in bare_times]}, flow {[round(t, 2) for t in flow_times]}")
    pairs = [bare_time / flow_time for bare_time, flow_time in zip(bare_times, flow_times)]
    print(f"per-pair ratios (bare/flow, run back to back): {[round(r, 3) for r in pairs]}")
    print(f"flow output bit-identical to bare: {same}")
    print("target: cache off and cold >= 0.95x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
