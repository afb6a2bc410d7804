"""Inference stage: the Engine protocol, the in-process torch engine and the SGLang client."""
