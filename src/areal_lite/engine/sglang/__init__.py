"""The SGLang client: token-in/token-out HTTP, control routes, weight updates, routing."""
