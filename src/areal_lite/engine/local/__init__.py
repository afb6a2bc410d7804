"""The in-process torch engine: continuous batching, a padded KV cache, a fused forward."""
