"""The world as a grid of named axes (e.g. replica x stage), split into one sub-World per axis.

Ranks are laid out row-major over the axes, outermost first, as picotron does with
`arange(world).view(dp, pp, tp)`: with axes (replica=R, stage=S), world rank
r * S + s is stage s of replica r, so one replica's stages are neighbouring ranks.
"""

from __future__ import annotations

import math

from hpcdl.comm import World
from hpcdl.device import to_cpu


class Grid:
    """This rank's coordinates on the grid, a sub-World per axis, and its pipeline neighbours.

    The axes come from a checked `Layout` (hpcdl.parallel.layout), so their sizes multiply to the world's.
    """

    def __init__(self, world: World, axes: dict[str, int]):
        if math.prod(axes.values()) != world.size:  # a bug, not a user error: the Layout checked the degrees
            raise ValueError(f"grid axes {axes} do not multiply to the world's {world.size} ranks")
        self.world, self.axes = world, dict(axes)
        self.coords: dict[str, int] = {}
        rest = world.rank
        for name, size in reversed(axes.items()):
            rest, self.coords[name] = divmod(rest, size)
        self.coords = {name: self.coords[name] for name in axes}
        # A sub-World per axis: the ranks that differ only in that coordinate (a collective: every rank splits).
        self.groups = {name: world.split(self._color_without(name), self.coords[name]) for name in axes}

    def _color_without(self, axis: str) -> int:
        """A number shared by exactly the ranks whose other coordinates equal this rank's."""
        color = 0
        for name, size in self.axes.items():
            color = color * size + (0 if name == axis else self.coords[name])
        return color

    def group(self, axis: str) -> World:
        """The sub-World along `axis`: its rank equals this rank's coordinate on that axis."""
        return self.groups[axis]

    def size(self, axis: str) -> int:
        """How many ranks lie along `axis` (1 for an axis the grid does not have)."""
        return self.axes.get(axis, 1)

    def coord(self, axis: str) -> int:
        """This rank's coordinate on `axis` (0 for an axis the grid does not have)."""
        return self.coords.get(axis, 0)

    def gather_on_root(self, axis: str, part):
        """Every rank's `part` along `axis` of replica 0, in axis order, on world rank 0; None elsewhere.

        How a split model's pieces meet on the rank that writes checkpoints."""
        if self.coord("replica") != 0:
            return None
        group = self.group(axis)
        parts = group.gather(to_cpu(part), root=0)  # pickled: CPU tensors, whatever GPU each rank uses
        return parts if group.rank == 0 else None

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline's first stage (it reads features)."""
        return self.coord("stage") == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline's last stage (it computes the loss)."""
        return self.coord("stage") == self.size("stage") - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """The previous stage's rank in the stage sub-World (None on the first stage)."""
        return None if self.is_first_stage else self.coord("stage") - 1

    @property
    def next_stage_rank(self) -> int | None:
        """The next stage's rank in the stage sub-World (None on the last stage)."""
        return None if self.is_last_stage else self.coord("stage") + 1
