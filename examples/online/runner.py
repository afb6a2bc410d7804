"""An outside agent runner for `areal-lite serve` (online mode), in its own process.

    areal-lite serve examples/online/config.toml            # terminal 1: the trainer
    python examples/online/runner.py runs/online/trial0/online.json   # terminal 2

It reads the server's `online.json` (base URL, admin URL, admin key file, group size),
then runs groups of episodes until the server goes away: per episode it opens a session
(POST /admin/online/sessions with a group_id), lets a plain OpenAI-SDK agent talk to the
session's base URL with the session key, sets the reward and ends the session. Any agent
harness pointed at a base URL (a coding CLI, another framework) fits in `agent`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

import httpx
from openai import APIError, AsyncOpenAI


async def agent(base_url: str, api_key: str, question: str) -> tuple[str, str]:
    """The agent: one chat completion. Returns (completion id, reply)."""
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    resp = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": question}], max_tokens=16)
    await client.close()
    return resp.id, resp.choices[0].message.content or ""


async def episode(admin: httpx.AsyncClient, group_id: str, a: int, b: int) -> None:
    question = f"What is {a} + {b}? Answer with the number only."
    start = await admin.post("/admin/online/sessions",
                             json={"group_id": group_id, "data": {"question": question}})
    start.raise_for_status()
    s = start.json()
    completion_id, reply = await agent(s["base_url"], s["api_key"], question)
    reward = 1.0 if str(a + b) in reply else 0.1 * (len(reply) % 3)  # some spread for GRPO
    (await admin.post(f"/admin/online/sessions/{s['session_id']}/reward",
                      json={"reward": reward, "completion_id": completion_id})).raise_for_status()
    (await admin.post(f"/admin/online/sessions/{s['session_id']}/end")).raise_for_status()


async def main(online_json: str, parallel_groups: int, seed: int) -> int:
    info = json.loads(Path(online_json).read_text())
    key = Path(info["admin_key_file"]).read_text().strip()
    rng, num_groups = random.Random(seed), 0
    async with httpx.AsyncClient(base_url=info["admin_url"], timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as admin:
        async def groups(worker: int) -> None:
            nonlocal num_groups
            for g in range(1 << 30):
                a, b = rng.randint(1, 50), rng.randint(1, 50)
                await asyncio.gather(*(episode(admin, f"w{worker}-g{g}", a, b)
                                       for _ in range(info["group_size"])))
                num_groups += 1
        try:
            await asyncio.gather(*(groups(w) for w in range(parallel_groups)))
        except (httpx.HTTPError, APIError) as e:  # the run ended: the server went away
            print(json.dumps({"groups": num_groups, "stopped": type(e).__name__}))
    return 0 if num_groups else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("online_json", help="the server's {run dir}/online.json")
    p.add_argument("--parallel-groups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sys.exit(asyncio.run(main(args.online_json, args.parallel_groups, args.seed)))
