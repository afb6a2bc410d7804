"""The older proxy style: a module with `async def run_agent_return_reward(data)`."""

import os

from openai import AsyncOpenAI


async def run_agent_return_reward(data):
    client = AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"],
                         api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": data["question"]}], max_tokens=4)
    return 0.5
