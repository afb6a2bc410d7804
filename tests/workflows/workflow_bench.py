"""The shipped workflows' test bench: a fake SGLang model scripted to use the tools it is
offered (a handoff first, else the calculator once, then it answers), and checks."""

from __future__ import annotations

import re

ANSWER = "3 + 4 = 7. The answer is \\boxed{7}."


def scripted_reply(prompt: str) -> str:
    """What the scripted model says after `prompt` (the rendered chat): a handoff when
    offered one and not just handed off, else the calculator until it answered (7)."""
    before_reply = prompt.rsplit("<|im_start|>", 2)[-2]  # the last message
    tools = re.findall(r'"name": "(\w+)"', prompt.partition("<tools>")[2].partition("</tools>")[0])
    handoff = [t for t in tools if t.startswith("transfer_to")]
    if handoff and "<tool_response>" not in before_reply:
        return f'<tool_call>\n{{"name": "{handoff[0]}", "arguments": {{}}}}\n</tool_call>'
    if "calculator" in tools and "<tool_response>\n7\n</tool_response>" not in prompt:
        return ('<tool_call>\n{"name": "calculator", "arguments": '
                '{"expression": "3 + 4"}}\n</tool_call>')
    return ANSWER


class ToolUsingModel:
    def __init__(self, tok) -> None:
        self.tok, self.replies = tok, []

    def __call__(self, input_ids, sampling):
        reply = scripted_reply(self.tok.decode(input_ids))
        self.replies.append(reply)
        return self.tok.encode(reply, add_special_tokens=False) + [self.tok.eos_token_id]



def assert_linked_turns(groups, at_least: int = 2) -> None:
    """Every episode made >= `at_least` completions, chained in its tree (one concat
    sample covers them all)."""
    for g in groups:
        for ep in g.episodes:
            assert ep.num_completions >= at_least, ep
            assert max(len(s.completion_ids) for s in ep.samples) >= at_least
