"""How the world's ranks split the work, checked once before anything is allocated (as torchtitan's ParallelDims).

A `Layout` holds the degrees of each way of splitting (replicas x stages, replicas x tensor,
column ranks), the global batch and its micro-batches. Built from the config and the world
size, it checks every rule that ties them together (degrees multiply to the world, the batch
splits, stages and cuts fit the model, the model fits tensor or column splitting), each failure
one line naming the key and what would work. The grid of sub-communicators derives from it.
No other place checks layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.data.schema import DatasetInfo
from hpcdl.errors import ConfigError, DataError
from hpcdl.parallel.grid import Grid

# The axis each mode splits along besides the replicas, and the config key that sizes it.
SPLIT_AXIS = {"pipeline": ("stage", "stages"), "tensor": ("tensor", "tensor")}
# Parameter-server modes: the first `parallel.servers` ranks hold the parameters; the others split the batch.
SERVER_MODES = ("ps-sync", "ps-async")
# Layers allowed between a column- and a row-parallel Linear: elementwise, without parameters or randomness.
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Identity)


def _example_multiple(value: int, factor: int) -> int:
    """The nearest multiple of `factor` at or below `value` (at least `factor`): the "e.g." of a message."""
    return max(factor, value - value % factor)


@dataclass(frozen=True)
class Layout:
    """The degrees of parallelism of one run; constructing it checks every rule that needs no model or data."""

    mode: str
    world_size: int
    replicas: int = 1  # copies of the model that split each global batch
    stages: int = 1  # pipeline: stages per replica
    tensor: int = 1  # tensor: ranks each Linear pair is split over
    micro_batches: int = 1  # pipeline: micro-batches per global batch
    batch_size: int = 0  # the global batch; 0: not known here (a Pipeline built from a script)
    cuts: tuple[int, ...] = ()  # pipeline: layer indices where stages 2..S begin
    servers: int = 0  # ps-sync/ps-async: ranks 0..servers-1 hold the parameters and read no data

    def __post_init__(self) -> None:
        if self.mode in SPLIT_AXIS:
            self._check_degrees()
        if self.mode in SERVER_MODES and self.servers >= self.world_size:
            raise ConfigError(
                f"config: parallel.servers = {self.servers} leaves no worker among the job's {self.world_size} "
                f"ranks; use at most {max(1, self.world_size - 1)} server(s) and run on at least 2 ranks"
            )
        batch, parts = self.batch_size, self.batch_parts
        if batch and batch % parts:
            raise ConfigError(self._batch_message(batch, parts))
        if self.cuts and len(self.cuts) != self.stages - 1:
            raise ConfigError(
                f"config: parallel.cuts = {list(self.cuts)} must name {self.stages - 1} layer indices "
                f"for parallel.stages = {self.stages}"
            )

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> Layout:
        """The layout the config asks for on `world_size` ranks; a ConfigError says what would work."""
        par = cfg.parallel  # a key of another mode was refused by config.check (its read_when)
        if par.mode == "ps-async":
            # Each gradient is applied alone as it arrives: a whole-batch norm, loss scale or sum does not exist.
            for name, value, off in (("train.clip_grad_norm", cfg.train.clip_grad_norm, 0.0),
                                     ("train.precision", cfg.train.precision, "fp32"),
                                     ("parallel.accumulate_steps", par.accumulate_steps, 1)):  # fmt: skip
                if value != off and not (name == "train.precision" and value == "bf16"):
                    raise ConfigError(
                        f"config: {name} = {value!r} is not available with parallel.mode = 'ps-async' (the servers "
                        "apply each worker's gradient alone as it arrives); use ps-sync, or leave it off"
                    )
        servers = par.servers if par.mode in SERVER_MODES else 0
        replicas = {"columns": 1}.get(par.mode, world_size - servers)
        if par.mode in SPLIT_AXIS:
            replicas = par.replicas
        return cls(
            par.mode, world_size, replicas, par.stages, par.tensor,
            par.micro_batches if par.mode == "pipeline" else 1, cfg.train.batch_size, tuple(par.cuts), servers,
        )  # fmt: skip

    # -- what derives from it

    @property
    def axes(self) -> dict[str, int]:
        """The grid's axes, outermost first: world rank = row-major position on them."""
        if self.mode in SPLIT_AXIS:
            axis, _ = SPLIT_AXIS[self.mode]
            return {"replica": self.replicas, axis: self.world_size // self.replicas}
        if self.mode == "columns":
            return {"column": self.world_size}
        return {"replica": self.world_size}

    @property
    def batch_parts(self) -> int:
        """Into how many pieces each global batch is cut (replicas x micro-batches; 1 for columns)."""
        return self.replicas * self.micro_batches

    @property
    def model_device(self) -> str:
        """Where the whole model is built: "meta" (shapes only) when each rank allocates just its own part."""
        return "meta" if self.mode == "pipeline" else "cpu"

    def grid(self, world: World) -> Grid:
        """This rank's place on the layout's grid, with a sub-World per axis (a collective: every rank calls it)."""
        return Grid(world, self.axes)

    # -- rules that need the data or the model

    def check_data(self, info: DatasetInfo) -> None:
        """The dataset holds at least one global batch, and column splitting has columns to split."""
        if info.sizes["train"] < self.batch_size:
            raise DataError(
                f"{info.path}: /train has {info.sizes['train']} samples, fewer than one global batch of "
                f"{self.batch_size}; lower train.batch_size or use more data"
            )
        if self.mode == "columns" and len(info.feature_shape) != 1:
            raise DataError(
                f"{info.path}: parallel.mode = 'columns' needs flat samples (one feature dimension), "
                f"got feature_shape {tuple(info.feature_shape)}"
            )

    def check_model(self, model: nn.Module) -> None:
        """The model can be split as asked: stages and cuts, tensor pairs, or a first Linear to split by columns."""
        if self.mode == "pipeline":
            self.check_stages([layer for _, layer in named_layers(model, "pipeline")])
        elif self.mode == "tensor":
            linear_pairs(model, self.world_size // self.replicas)
        elif self.mode == "columns":
            self._check_columns(model)
        elif self.mode == "zero" and len({p.dtype for p in model.parameters() if p.requires_grad}) > 1:
            raise ConfigError("config: parallel.mode = 'zero' needs a model whose parameters share one dtype")
        elif self.mode in SERVER_MODES:
            trained = [p for p in model.parameters() if p.requires_grad]
            count = len(trained)
            if self.mode == "ps-async" and len({p.dtype for p in trained}) > 1:
                raise ConfigError("config: parallel.mode = 'ps-async' needs a model whose parameters share one dtype")
            if count < self.servers:
                raise ConfigError(
                    f"config: parallel.servers = {self.servers} but the model has only {count} parameter tensors "
                    f"to deal out; use at most {count} servers"
                )

    def check_stages(self, layers: list[nn.Module]) -> None:
        """`stages` stages can be made of `layers` (at `cuts`, if named)."""
        n, weighted = len(layers), sum(map(has_params, layers))
        stages, cuts = self.stages, list(self.cuts)
        if stages > weighted:
            raise ConfigError(
                f"parallel.stages = {stages} but the model has only {weighted} layers with parameters "
                f"(of {n}); use at most {weighted} stages"
            )
        if cuts and (sorted(set(cuts)) != cuts or cuts[0] < 1 or cuts[-1] >= n):
            raise ConfigError(
                f"parallel.cuts = {cuts} must be {stages - 1} increasing layer indices in 1..{n - 1} "
                f"(where stages 2..{stages} begin); the model's layers: "
                + ", ".join(f"{i} {type(layer).__name__}" for i, layer in enumerate(layers))
            )
        bounds = [0, *cuts, n]
        for stage, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if cuts and not any(map(has_params, layers[a:b])):
                raise ConfigError(
                    f"parallel.cuts = {cuts} leave stage {stage + 1} (layers {a}..{b - 1}) without parameters"
                )

    # -- messages

    def _check_degrees(self) -> None:
        _, key = SPLIT_AXIS[self.mode]
        degree = getattr(self, key)
        if degree * self.replicas == self.world_size:
            return
        fix = (
            f"use --set parallel.replicas={self.world_size // degree}"
            if self.world_size % degree == 0
            else f"run on a multiple of {degree} ranks"
        )
        raise ConfigError(
            f"config: parallel.{key} = {degree} x parallel.replicas = {self.replicas} needs "
            f"{degree * self.replicas} ranks, but the job has {self.world_size}; {fix} (or change parallel.{key})"
        )

    def _batch_message(self, batch: int, parts: int) -> str:
        good = _example_multiple(batch, parts)
        if self.mode in ("data", "local-sgd", "zero"):
            return (
                f"config: train.batch_size = {batch} is not divisible by the {parts} ranks; "
                f"use a multiple of {parts} (e.g. {good})"
            )
        if self.mode in SERVER_MODES:
            return (
                f"config: train.batch_size = {batch} is not divisible by the {parts} workers ({self.world_size} "
                f"ranks less {self.servers} server(s)); use a multiple of {parts} (e.g. {good})"
            )
        return (
            f"config: train.batch_size = {batch} does not split into {self.replicas} replica(s) x "
            f"{self.micro_batches} micro-batches; use a multiple of {parts} (e.g. {good}) "
            "or other parallel.micro_batches"
        )

    def _check_columns(self, model: nn.Module) -> None:
        layers = list(model) if isinstance(model, nn.Sequential) else []
        if len(layers) < 2 or not isinstance(layers[0], nn.Flatten) or not isinstance(layers[1], nn.Linear):
            raise ConfigError("config: parallel.mode = 'columns' needs model.name = 'mlp' (Flatten, then Linear)")
        features = layers[1].in_features
        if features < self.world_size:
            raise ConfigError(
                f"config: parallel.mode = 'columns' splits {features} features over {self.world_size} ranks; "
                f"use at most {features} ranks"
            )


def has_params(layer: nn.Module) -> bool:
    """Whether a layer holds parameters (a stage may begin only at such a layer)."""
    return any(True for _ in layer.parameters())


def named_layers(model: nn.Module, mode: str) -> list[tuple[str, nn.Module]]:
    """The (name, layer) list of a Sequential model, or one line saying `mode` needs one."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"parallel.mode = '{mode}' needs an nn.Sequential model (mlp, cnn, or a factory returning "
            f"nn.Sequential); {type(model).__name__} is not one: use parallel.mode = 'data'"
        )
    return list(model.named_children())


def linear_pairs(model: nn.Module, tensor: int) -> list[tuple[int, int]]:
    """(column, row) indices of the MLP's Linear pairs split over `tensor` ranks; a ConfigError if they can't be."""
    layers = [layer for _, layer in named_layers(model, "tensor")]
    linear_at = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
    pairs = list(zip(linear_at[0::2], linear_at[1::2]))
    for col, row in pairs:
        between = [type(layer).__name__ for layer in layers[col + 1 : row] if not isinstance(layer, ELEMENTWISE)]
        if between:
            raise ConfigError(
                f"tensor parallel: layers {', '.join(between)} between Linear {col} and {row} can't be split"
            )
        hidden = layers[col].out_features
        if hidden % tensor:
            raise ConfigError(
                f"tensor parallel: hidden width {hidden} (layer {col}) is not divisible by parallel.tensor = "
                f"{tensor}; use hidden sizes that are multiples of {tensor}"
            )
    return pairs
