"""areal-lite: train LLM agents written against the OpenAI/Anthropic APIs with RL."""

__all__: list[str] = []
