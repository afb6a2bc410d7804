"""Trainer stage: advantages and losses, logprobs, the learner, checkpoints, weight sync."""
