"""Code as the reference documents show it, with only the package name changed
(`areal.api.workflow_api` / `areal.utils.proxy_utils` -> `areal_lite`)."""

import asyncio

from openai import AsyncOpenAI

from areal_lite import AgentWorkflow, run_and_submit_rewards


async def my_agent(data: dict) -> float:
    client = AsyncOpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": data["question"]}], max_tokens=4)
    return 0.75


class MyAgentWorkflow(AgentWorkflow):
    async def run(self, data: dict):
        return await my_agent(data)


async def run_agent_return_reward(data: dict) -> float:
    return await my_agent(data)


async def run_and_submit(data: dict):
    await run_and_submit_rewards(func=run_agent_return_reward, data=data)


# Compatible to be run in subprocess mode
if __name__ == "__main__":
    import json
    import sys

    data = json.loads(sys.stdin.readline())
    asyncio.run(run_and_submit(data))
