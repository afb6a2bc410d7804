"""A fake SGLang server as its own process, for the multi-process trainer tests:
`python fake_sglang_proc.py VOCAB` prints its base url on one line, serves until stdin closes."""

from __future__ import annotations

import asyncio
import sys

from areal_lite.testing.fake_sglang.server import FakeSGLangServer


async def main(vocab: int) -> None:
    async with FakeSGLangServer(vocab_size=vocab, max_context_len=2048) as fake:
        print(fake.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
