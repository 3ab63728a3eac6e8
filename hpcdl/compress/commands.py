"""`hpcdl prune RUN_DIR --sparsity S [--structured l1|l2 --fraction F] --out DIR`: a trained run's model pruned
into a new run folder (a checkpoint with the run's config, hidden sizes changed if structured, model.pt and
config.toml) that `hpcdl export`, `hpcdl infer` and `hpcdl evaluate` take like any run, and that a new run trains
further from (`hpcdl train --config DIR/config.toml --set train.init=DIR --set run.dir=NEW`: fine-tuning)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from hpcdl.errors import HpcdlError


def prune_run(
    target: str, out: str, sparsity: float, structured: str | None, fraction: float, overwrite: bool = False
) -> dict:
    """Load `target`'s newest valid checkpoint, prune (neurons first, then weights), write OUT; what was done.

    OUT is checked before anything is loaded; a non-empty one is refused, or with `overwrite` moved aside.
    """
    from hpcdl import checkpoint
    from hpcdl.compress import prune
    from hpcdl.config import PruneConfig
    from hpcdl.infer.model import output_classes, run_config
    from hpcdl.models import build, torch_dtype

    for name, value in (("--sparsity", sparsity), ("--fraction", fraction)):
        if not (math.isfinite(value) and 0 <= value < 1):
            raise HpcdlError(f"{name} must be >= 0 and < 1, got {value}")
    out_dir = Path(out)
    aside = check_out(out_dir, overwrite)
    notes: list[str] = []
    path = checkpoint.locate(target, notes)
    state = checkpoint.load(path)
    cfg = run_config(state, path)
    if structured and cfg.model.name != "mlp":
        raise HpcdlError(f"--structured prunes an MLP's hidden neurons; {path} holds a {cfg.model.name!r} model")
    shape = tuple(state.get("dataset", {}).get("feature_shape") or ())
    if not shape:
        raise HpcdlError(f"checkpoint {path} does not record its data's sample shape (written by an older hpcdl?)")
    model = build(cfg.model, shape, output_classes(state["model"]), cfg.train.seed, cfg.folder, "cpu",
                  torch_dtype(cfg.model.dtype))  # fmt: skip
    checkpoint.restore_model(model, state, path)
    before = sum(p.numel() for p in model.parameters())
    if structured:
        kept = prune.keep_neurons(model, fraction, structured)
        model = prune.prune_neurons(model, kept)
        cfg.model.hidden = [len(k) for k in kept]
    threshold, k = prune.prune_module(model, sparsity)
    zeros, weights = prune.sparsity_of(model)
    weights_only = {name: t.detach().clone() for name, t in model.state_dict().items()}
    cfg.run.dir, cfg.train.init = str(out_dir), ""
    # A run started from these weights (train.init) keeps their zeros from its step 0: masks kept, no new ramp.
    cfg.prune = PruneConfig(final_sparsity=zeros / weights, start=0, end=0) if zeros else PruneConfig()
    saved = {key: state[key] for key in ("dataset", "source", "epoch", "global_step", "step_in_epoch") if key in state}
    saved.update(model=weights_only, config=cfg.to_dict(), pruned_from=str(path))
    write_folder(out_dir, aside, saved)
    return {
        "checkpoint": str(path), "out": str(out_dir), "parameters_before": before, "moved_aside": aside and str(aside),
        "parameters": sum(t.numel() for t in weights_only.values()), "hidden": list(cfg.model.hidden),
        "threshold": threshold, "pruned": zeros, "weights": weights, "k": k,
    }  # fmt: skip


def check_out(out_dir: Path, overwrite: bool) -> Path | None:
    """OUT can be made and written; one that holds anything is refused, or (`overwrite`) will move aside: where to."""
    from hpcdl.outputs import check_new_folder, existing_output
    from hpcdl.rundir import aside_name

    check_new_folder("--out", out_dir)
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return None
    if not overwrite:
        raise existing_output("--out", out_dir, "is a folder that is not empty", "move it aside and write a new one")
    return aside_name(out_dir)


def write_folder(out_dir: Path, aside: Path | None, saved: dict) -> None:
    """The pruned run folder (checkpoint, model.pt, config.toml), built under a temporary name beside OUT and renamed
    into place once complete (the old OUT moved to `aside` first): a failure leaves no partial folder."""
    import shutil

    from hpcdl import checkpoint
    from hpcdl.rundir import move_aside, write_config

    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted prune's leftover
    try:
        checkpoint.save(partial, int(saved.get("global_step", 0)), saved, keep=1)
        checkpoint.save_weights(partial, saved["model"])
        write_config(partial, saved["config"])
        if aside:
            move_aside(out_dir, aside)
        os.replace(partial, out_dir)
    except OSError as exc:
        raise HpcdlError(f"cannot write {out_dir}: {exc.strerror or exc} ({exc.filename or partial})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone once renamed; after a failure, nothing partial stays


def finetune_command(pruned: str, epochs: int) -> str:
    """The command that trains a pruned folder's model further, in a new run folder beside it."""
    from hpcdl.rundir import CONFIG

    config, into = Path(pruned) / CONFIG, f"{Path(pruned)}-finetuned"
    return (f"hpcdl train --config {config} --set train.init='{pruned}' --set run.dir='{into}' "
            f"--set train.epochs={epochs}")  # fmt: skip


def _prune(args: argparse.Namespace) -> int:
    done = prune_run(args.run_dir, args.out, args.sparsity, args.structured, args.fraction, args.overwrite)
    if done["moved_aside"]:
        print(f"hpcdl: --overwrite: the previous {done['out']} moved to {done['moved_aside']}")
    print(
        f"hpcdl: pruned {done['checkpoint']}: {done['parameters_before']:,} -> {done['parameters']:,} parameters"
        f" (hidden {done['hidden']}), {done['pruned']:,} of {done['weights']:,} weights zero; wrote {done['out']}"
    )
    print(f"hpcdl: fine-tune it: {finetune_command(done['out'], 3)}")
    return 0


def register(commands) -> None:
    """Add `prune` to the top-level subcommands."""
    prune = commands.add_parser("prune", help="a trained run's model pruned (magnitude, or MLP neurons) into OUT")
    prune.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its newest valid checkpoint) or a checkpoint")
    prune.add_argument("--sparsity", type=float, default=0.0, help="fraction of Linear/Conv weights zeroed (global)")
    prune.add_argument("--structured", choices=("l1", "l2"), help="drop MLP hidden neurons by their weights' norm")
    prune.add_argument("--fraction", type=float, default=0.5, help="with --structured: each layer's share dropped")
    prune.add_argument("--out", required=True, metavar="DIR", help="the new run folder (checkpoint and model.pt)")
    prune.add_argument(
        "--overwrite", action="store_true", help="move a non-empty DIR aside to DIR.old-TIME (else refused)"
    )
    prune.set_defaults(func=_prune)
