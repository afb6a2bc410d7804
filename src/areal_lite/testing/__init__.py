"""Test doubles shipped in the wheel: tiny random models and a faithful fake SGLang server."""
