"""A fake SGLang server (aiohttp) that speaks the protocol our client uses, for tests and benchmarks."""
