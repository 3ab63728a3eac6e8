"""Smaller models: magnitude pruning (prune.py) and its command, `hpcdl prune` (commands.py)."""
