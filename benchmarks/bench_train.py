"""Overhead of the ``train`` and ``infer`` flows against bare loops, measured in the same process.

train: N optimizer steps through the ``train`` flow (real Prefect server via prefect_test_harness;
checkpoints, one validation pass, artifacts and the final save included) against a bare accelerate
loop (same model, data, batch size, optimizer and schedule; no checkpoints, validation or save).
infer: the ``infer`` flow on inline texts (model already cached, artifacts included) against a bare
forward pass over the same texts. Target: flow >= 0.95x bare.
Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_train.py [--quick] [--steps N --texts N]``; on a GPU,
``benchmarks/gpu_check.sh`` runs it with bf16 (``ACCELERATE_MIXED_PRECISION``, which the flow's and
the bare loop's ``Accelerator()`` both read).

Measured 2026-11-23 with --quick on 2 CPU cores shared with other heavy jobs (load 6-9), so the
ratios are noise, not overhead: train 30 steps bare 398 s vs flow 279 s (1.43x); infer 500 texts
bare 18.9 s vs flow 12.3 s (1.54x). Re-measure on a quiet machine before trusting either.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

WORDS = {
    "sports": "team match goal striker coach players stadium referee league season score final".split(),
    "weather": "rain sunny wind snow forecast cloudy temperature storm frost humid breeze thunder".split(),
    "cooking": "bake bread salt soup onions sauce recipe eggs garlic oven simmer flour".split(),
}


def synthetic_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    return [{"text": " ".join(rng.choices(WORDS[label], k=rng.randint(6, 14))), "label": label}
            for label in (labels[i % len(labels)] for i in range(count))]


def write(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return str(path)


def bare_train(rows: list[dict[str, str]], steps: int, batch_size: int, max_length: int, lr: float) -> float:
    """The loop anyone would write by hand with accelerate: the baseline."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from taskserver.inference import build_model, default_base_model

    started = time.perf_counter()
    base = default_base_model()
    labels = sorted({r["label"] for r in rows})
    accelerator = Accelerator()
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = build_model(base, len(labels))

    def collate(batch):
        enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([labels.index(r["label"]) for r in batch])

    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(steps * 0.06), steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    done = 0
    while done < steps:
        for input_ids, mask, target in loader:
            loss = torch.nn.functional.cross_entropy(model(input_ids, mask), target)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done >= steps:
                break
    accelerator.end_training()
    return time.perf_counter() - started


def bare_infer(model_dir: str, texts: list[str], batch_size: int) -> float:
    import torch

    from taskserver.inference import Classifier

    classifier = Classifier.load(model_dir)  # the same cached model the flow uses: only the loop is timed
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = classifier.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                       max_length=classifier.info.max_length, return_tensors="pt")
            enc = {key: value.to(classifier.device) for key, value in enc.items()}
            torch.softmax(classifier.model(enc["input_ids"], enc["attention_mask"]), dim=-1).tolist()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30 steps and 500 texts instead of 300 and 3000")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300, 30 with --quick)")
    parser.add_argument("--texts", type=int, default=None, help="texts to infer (default 3000, 500 with --quick)")
    parser.add_argument("--infer-batch-size", type=int, default=64)
    args = parser.parse_args()
    steps = args.steps or (30 if args.quick else 300)
    n_texts = args.texts or (500 if args.quick else 3000)

    import torch
    from prefect.testing.utilities import prefect_test_harness

    # Flows run as the job lane runs them (taskserver.platform.job_engine): no engine heartbeat thread.
    from taskserver.flows.heartbeats import without_engine_heartbeats

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    train_rows = synthetic_rows(steps * args.batch_size, seed=0)  # exactly one epoch of `steps` steps
    validation_rows = synthetic_rows(60, seed=1)
    texts = [r["text"] for r in synthetic_rows(n_texts, seed=2)]
    lr = 1e-4

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, prefect_test_harness(server_startup_timeout=120), \
            without_engine_heartbeats():
        from taskserver.flows.infer import infer
        from taskserver.flows.train import train

        tmp_path = Path(tmp)
        data = write(tmp_path / "train.jsonl", train_rows)
        validation = write(tmp_path / "validation.jsonl", validation_rows)

        bare_seconds = bare_train(train_rows, steps, args.batch_size, args.max_length, lr)
        started = time.perf_counter()
        summary = train(data_path=data, validation_path=validation, output_dir=str(tmp_path / "run"), epochs=1,
                        batch_size=args.batch_size, max_length=args.max_length, learning_rate=lr,
                        checkpoint_every=args.checkpoint_every, max_steps=steps)
        flow_seconds = time.perf_counter() - started
        assert summary["steps"] == steps, summary
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        samples = steps * args.batch_size
        print(f"train, {steps} steps, batch {args.batch_size}, max_length {args.max_length}, on {device},"
              f" mixed precision {precision}:")
        print(f"  bare accelerate loop: {bare_seconds:7.2f}s  {steps / bare_seconds:6.2f} steps/s"
              f"  {samples / bare_seconds:8.1f} samples/s")
        print(f"  train flow:           {flow_seconds:7.2f}s  {steps / flow_seconds:6.2f} steps/s"
              f"  {samples / flow_seconds:8.1f} samples/s  (val accuracy {summary['val_accuracy']:.3f})")
        print(f"  ratio flow/bare throughput: {bare_seconds / flow_seconds:.3f}x (target >= 0.95x)")

        model_dir = summary["model_dir"]
        infer(model_dir=model_dir, texts=texts[:16], batch_size=args.infer_batch_size)  # load and cache the model once
        bare = bare_infer(model_dir, texts, args.infer_batch_size)
        started = time.perf_counter()
        result = infer(model_dir=model_dir, texts=texts, batch_size=args.infer_batch_size)
        flow = time.perf_counter() - started
        assert result["count"] == len(texts)
        print(f"infer, {len(texts)} texts, batch {args.infer_batch_size} (model warm in both):")
        print(f"  bare forward: {bare:7.2f}s  {len(texts) / bare:7.1f} texts/s")
        print(f"  infer flow:   {flow:7.2f}s  {len(texts) / flow:7.1f} texts/s")
        print(f"  ratio flow/bare throughput: {bare / flow:.3f}x (target >= 0.95x)")
        if torch.cuda.is_available():
            print(f"  GPU memory, most allocated by this process: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
