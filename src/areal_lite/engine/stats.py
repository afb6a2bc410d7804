"""What an engine did: totals it counts, and the per-step metrics the trainer logs.

`EngineStats` holds running totals since the engine started (the local engine counts its
steps; the SGLang client counts what the responses say). The trainer takes a copy at
every RL step's metrics and logs the difference from the previous one (`engine_metrics`:
all the engine did in between, evaluation included), so a run's metrics show how busy
the engine was, how many rows a decode step carried, and how much prompt prefill the
shared-prefix and prefix-cache reuse saved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class EngineStats:
    """Totals since the engine started (written by one thread: the local engine's step
    thread, or the SGLang client's event loop)."""

    steps: int = 0  # forward passes of the running batch (each decodes and/or prefills)
    busy_s: float = 0.0  # wall time spent inside steps
    decode_tokens: int = 0  # tokens sampled for rows that were already running
    generated_tokens: int = 0  # every sampled token (decode + each admitted row's first)
    prompt_tokens: int = 0  # prompt tokens of the admitted requests
    prefill_tokens: int = 0  # of those, the ones run through the model (rest: reused KV)
    step_counts: bool = True  # False: counted from responses (SGLang); steps, busy_s and
    # decode_tokens then stay 0 and engine_metrics leaves their metrics out

    def copy(self) -> EngineStats:
        return replace(self)


def engine_metrics(before: EngineStats, after: EngineStats, wall_s: float) -> dict[str, float]:
    """Metrics for the interval between two snapshots taken `wall_s` seconds apart."""
    steps = after.steps - before.steps
    prompt = after.prompt_tokens - before.prompt_tokens
    prefill = after.prefill_tokens - before.prefill_tokens
    wall = max(wall_s, 1e-9)
    out = {"engine/gen_tokens_per_s": (after.generated_tokens - before.generated_tokens) / wall,
           "engine/prefill_reuse_frac": 1.0 - prefill / prompt if prompt else 0.0}
    if after.step_counts:
        out.update({"engine/steps": float(steps),
                    "engine/busy_frac": min(1.0, (after.busy_s - before.busy_s) / wall),
                    "engine/mean_decode_rows": ((after.decode_tokens - before.decode_tokens)
                                                / steps if steps else 0.0)})
    return out
