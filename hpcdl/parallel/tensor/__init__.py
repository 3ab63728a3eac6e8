"""Tensor parallel: Linear layers split inside themselves (layers.py) and the strategy that pairs them (strategy.py)."""
