"""Pipeline parallel: where to cut (stages.py), in what order (schedule.py), the traffic between
stages (p2p.py) and the strategy (strategy.py)."""

from hpcdl.parallel.pipeline.strategy import Pipeline

__all__ = ["Pipeline"]
