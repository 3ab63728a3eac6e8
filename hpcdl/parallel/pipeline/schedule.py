"""Pipeline schedules: the order of forward and backward micro-batches on each stage."""

from __future__ import annotations

from hpcdl.data.partition import block_sizes

SCHEDULES = ("gpipe", "1f1b")


def schedule(kind: str, stage: int, stages: int, micro: int) -> list[tuple[str, int]]:
    """This stage's actions in order: ("F", i) forward or ("B", i) backward of micro-batch i."""
    if kind == "gpipe":
        return [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]
    # 1F1B (PipeDream-Flush): fill the pipe, then alternate, then drain.
    warmup = min(stages - stage - 1, micro)
    actions = [("F", i) for i in range(warmup)]
    for i in range(micro - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(micro - warmup, micro)]


def peak_alive(actions: list[tuple[str, int]]) -> int:
    """Most micro-batches whose activations are held at once under `actions`."""
    alive = peak = 0
    for kind, _ in actions:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


def micro_sizes(rows: int, micro: int) -> list[int]:
    """Rows of each micro-batch (np.array_split's sizes); fewer micro-batches when rows < micro."""
    parts = min(micro, rows)
    return block_sizes(rows, parts).tolist() if parts else []
