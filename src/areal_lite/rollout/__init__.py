"""Rollout stage: agent workflows, the episode/group controller, the staleness-bounded producer."""
