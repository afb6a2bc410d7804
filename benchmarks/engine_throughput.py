"""Benchmark: local engine (continuous batching) vs Hugging Face `model.generate`.

Same model, same chat-templated prompts, same max_new_tokens, greedy. For each
concurrency N and each workload size W (`--waves`, default "1,4"), N x W prompts are
served: (a) by N client coroutines that each send the next prompt to `LocalEngine` as soon
as their previous request finishes (N requests always in flight, the way N agents use
it), (b) by `model.generate` on consecutive left-padded batches of N prompts (the way a
user without an engine would batch them). W = 1 is a single batch: there continuous
batching can only drop finished rows early; W > 1 is sustained load, where it also refills
the freed rows while `generate` waits for each batch's longest reply. Output tokens count
up to and including the first eos (a padded HF row keeps computing after its eos; those
tokens are not counted). Prints one JSON line per (concurrency, waves):

    {"bench": "engine_throughput", "concurrency": N, "waves": W, "engine_tok_s": ..,
     "hf_generate_tok_s": .., "ratio": .., "greedy_identical": true|false,
     "num_differ": .., "device": .., "dtype": .., "hf_step_ms": .., "matmul_floor_ms": ..,
     "step_ceiling": ..}

The last three bound what any engine could gain here: `hf_step_ms` is `generate`'s time
per decode step (its wall time over the steps it ran), `matmul_floor_ms` the time of one
decode step's matrix products alone (every `nn.Linear` of the model, `lm_head` included,
on N rows, on the same thread), and `step_ceiling` their ratio: an engine whose step cost
nothing but those products would be that many times faster per step than `generate`.

Usage::

    python benchmarks/engine_throughput.py                      # SmolLM2 alias, CPU fp32
    python benchmarks/engine_throughput.py --model tiny --concurrency 1,8
    python benchmarks/engine_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import torch

from areal_lite.engine.local.engine import LocalEngine
from areal_lite.models import load_causal_lm, load_tokenizer, resolve_model_dir
from areal_lite.types import GenerateRequest, SamplingParams

QUESTIONS = [
    "What is {a} + {b}? Answer briefly.",
    "Write one sentence about the number {a}.",
    "Name {c} animals that live in the sea.",
    "Is {a} an even number? Explain.",
    "Translate 'good morning' into French and count to {c}.",
    "What is {a} times {c}?",
    "Give me a short tip for learning to cook.",
    "Explain what a prime number is, with {c} examples.",
]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)].format(a=7 * i + 3, b=11 * i + 5, c=2 + i % 5)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys")
                            else ids))
    return prompts


def cut_at_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


async def run_engine(engine: LocalEngine, prompts, max_new_tokens: int, concurrency: int):
    """`concurrency` clients, each sending the next unserved prompt when its last is done."""
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    outputs: list[list[int]] = [[] for _ in prompts]
    todo = iter(enumerate(prompts))  # shared: each client takes the next prompt

    async def client() -> None:
        for i, p in todo:
            result = await engine.generate(GenerateRequest(rid=f"b{i}", input_ids=p, sampling=sp))
            outputs[i] = result.output_ids

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return outputs, time.perf_counter() - start


def run_hf_batches(model, tokenizer, prompts, max_new_tokens: int, eos, device, batch: int):
    """`model.generate` on consecutive batches of `batch` prompts; also returns the
    number of decode steps it ran."""
    outputs: list[list[int]] = []
    elapsed, steps = 0.0, 0
    for i in range(0, len(prompts), batch):
        out, secs, n = run_hf(model, tokenizer, prompts[i:i + batch], max_new_tokens, eos,
                              device)
        outputs += out
        elapsed += secs
        steps += n
    return outputs, elapsed, steps


def run_hf(model, tokenizer, prompts, max_new_tokens: int, eos: frozenset[int], device):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return [cut_at_eos(row[width:].tolist(), eos) for row in out], elapsed, out.shape[1] - width


def matmul_floor_ms(model, rows: int, device, repeats: int = 15) -> float:
    """Median time of one decode step's matrix products alone: every `nn.Linear` of the
    model (`lm_head` included) on `rows` token vectors. No engine steps faster than this
    with these kernels; attention, norms, rotary, KV writes and sampling come on top."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype
    inputs = {n: torch.randn(rows, n, dtype=dtype, device=device)
              for n in {m.in_features for m in linears}}
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up passes
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


async def bench(args) -> None:
    if args.model == "tiny":
        from areal_lite.testing.tiny import make_tiny_model_dir

        model_dir = make_tiny_model_dir(tempfile.mkdtemp(prefix="areal-lite-tiny-"))
    else:
        model_dir = resolve_model_dir(args.model)
    device = torch.device(args.device)
    model = load_causal_lm(model_dir, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(model_dir)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    max_n = max(concurrencies)
    async with LocalEngine(model, tokenizer=tokenizer, device=args.device,
                           max_batch_size=max(64, max_n), max_kv_tokens=1 << 22,
                           fused_forward=not args.no_fused_forward) as engine:
        eos = engine.eos_ids
        warm = make_prompts(tokenizer, 2)
        await run_engine(engine, warm, 4, 2)
        # generate runs on the engine's step thread: both sides share one OpenMP pool, as
        # each would have alone (a second torch thread slows the other's steps; see
        # LocalEngine.run_on_step_thread)
        await engine.run_on_step_thread(run_hf, model, tokenizer, warm, 4, eos, device)
        await engine.run_on_step_thread(matmul_floor_ms, model, 2, device, 1)
        for waves in [int(w) for w in args.waves.split(",")]:
            for n in concurrencies:
                prompts = make_prompts(tokenizer, n * waves)
                eng_s = hf_s = float("inf")
                for _ in range(args.repeats):  # interleaved, best of: robust to a busy machine
                    eng_out, secs = await run_engine(engine, prompts, args.max_new_tokens, n)
                    eng_s = min(eng_s, secs)
                    hf_out, secs, hf_steps = await engine.run_on_step_thread(
                        run_hf_batches, model, tokenizer, prompts, args.max_new_tokens, eos,
                        device, n)
                    hf_s = min(hf_s, secs)
                floor_ms = await engine.run_on_step_thread(matmul_floor_ms, model, n, device)
                hf_step_ms = hf_s / hf_steps * 1000
                eng_tok = sum(len(o) for o in eng_out) / eng_s
                hf_tok = sum(len(o) for o in hf_out) / hf_s
                differ = sum(a != b for a, b in zip(eng_out, hf_out))
                print(json.dumps({
                    "bench": "engine_throughput", "concurrency": n, "waves": waves,
                    "engine_tok_s": round(eng_tok, 1), "hf_generate_tok_s": round(hf_tok, 1),
                    "ratio": round(eng_tok / hf_tok, 2), "greedy_identical": differ == 0,
                    "num_differ": differ, "device": str(device), "dtype": str(model.dtype),
                    "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                    "threads": torch.get_num_threads(),
                    "fused_forward": engine._batch.fused is not None,
                    "hf_step_ms": round(hf_step_ms, 3), "matmul_floor_ms": round(floor_ms, 3),
                    "step_ceiling": round(hf_step_ms / floor_ms, 2),
                }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="HF dir, hub id, the SmolLM2 alias, or 'tiny'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (bf16 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--waves", default="1,4",
                        help="prompts per client: 1 = one batch, >1 = sustained load")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; best is kept")
    parser.add_argument("--no-fused-forward", action="store_true",
                        help="engine uses the model's HF forward (one pass per batch)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
