"""Proxy stage: the OpenAI/Anthropic-compatible HTTP door every agent goes through."""
