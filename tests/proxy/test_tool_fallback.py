"""Tools on a model whose chat template has no tool markup (like the embedded SmolLM2):
the Hermes fallback puts the schemas in the system message, parses `<tool_call>` back,
re-renders the call so the next turn continues it, and warns once."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from openai import AsyncOpenAI
from proxy_support import Script, make_cfg

from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.fixture
def plain_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat template that never reads `tools`."""
    out = shutil.copytree(tiny_model_dir, tmp_path / "plain")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(PLAIN_CHATML)
    config = out / "tokenizer_config.json"
    data = json.loads(config.read_text())
    if "chat_template" in data:
        data["chat_template"] = PLAIN_CHATML
        config.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("fallback", ["hermes", "none"])
async def test_tools_on_a_template_without_tool_markup(plain_model_dir, tiny_tokenizer, caplog,
                                                       fallback):
    script = Script(tiny_tokenizer)
    script.replies.extend([CALL, CALL, "It is 3."])
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=2048,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                responder=script) as fake:
        cfg = make_cfg(plain_model_dir, fake.url, f"rollout.proxy.tool_fallback={fallback}")
        async with open_rollout(cfg, "sample_agents.ChatAgent") as stack:
            session = stack.proxy.sessions.start()
            client = AsyncOpenAI(base_url=stack.proxy.base_url, api_key=session.key,
                                 max_retries=0, http_client=stack.controller.http_client)
            messages = [{"role": "user", "content": "What is 1 + 2?"}]
            with caplog.at_level(logging.WARNING):
                for _ in range(2):
                    first = await client.chat.completions.create(
                        model="default", messages=messages, tools=[ADD], max_tokens=64)
            prompt = tiny_tokenizer.decode(script.prompts[0])
            if fallback == "none":  # tools dropped, the reply is plain text
                assert "<tools>" not in prompt and first.choices[0].message.tool_calls is None
                return
            assert '<tools>\n{"name": "add"' in prompt and "<|im_start|>system" in prompt
            (call,) = first.choices[0].message.tool_calls
            assert call.function.name == "add" and json.loads(call.function.arguments) == {
                "a": 1, "b": 2}
            warned = [r for r in caplog.records if "no tool markup" in r.getMessage()]
            assert len(warned) == 1  # once, not per request
            messages += [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "3"}]
            await client.chat.completions.create(model="default", messages=messages,
                                                 tools=[ADD], max_tokens=64)
            nodes = session.cache.nodes  # two identical first turns, either one continued
            assert nodes[-1].parent_id in (nodes[0].id, nodes[1].id)  # re-rendered exactly
            assert session.num_prefix_breaks == 0
            assert "<tool_response>\n3\n</tool_response>" in tiny_tokenizer.decode(
                script.prompts[-1])
