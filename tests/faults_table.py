"""Every bad input and fault tried against `hpcdl train`, with the message and exit status expected.

Each row is one run under mpiexec (test_faults_table.py). `setup` names a prepared state of
the run folder or data (see SETUPS there); `status` None means "any non-zero" (a killed rank's
status is the launcher's); `within_s` bounds the time from the fault's injection to the end of the job;
`clean` means one line on stderr (none on success), no run folder left behind and every existing file
untouched (nothing partial). `script` runs tests/scripts/SCRIPT (or "{tmp}/NAME", a script the row's setup
writes in the test's folder) with `args` instead of `hpcdl train`.
Every failing row must end every rank within `within_s` of its first error line (or the fault).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_ERROR, EXIT_REQUEUE = 2, 75


@dataclass(frozen=True)
class Case:
    """One bad input or fault and what hpcdl must answer."""

    name: str
    args: tuple[str, ...]  # `--set k=v` as "k=v", other options as "--opt" then its value
    message: str
    status: int | None = EXIT_ERROR
    ranks: int = 2
    setup: str = ""
    within_s: float = 10.0
    clean: bool = True
    script: str = ""
    tracebacks: int = 0  # Python tracebacks on stderr: none for anything the user can fix


CASES = [
    # --fault itself, checked before the first collective.
    Case("fault spec malformed", ("--fault", "kill@x"), "--fault 'kill@x': expected KIND@RANK:STEP", ranks=1),
    Case("fault kind unknown", ("--fault", "explode@0:1"), "unknown kind 'explode'", ranks=1),
    Case("fault rank out of range", ("--fault", "kill@5:1"), "rank 5 does not exist in a job of 2 ranks"),
    # The [run] keys of this feature.
    Case(
        "nan_policy unknown",
        ("run.nan_policy='ignore'",),
        "run.nan_policy = 'ignore' is not one of abort, skip",
        ranks=1,
    ),
    Case("watchdog_s negative", ("run.watchdog_s=-1",), "run.watchdog_s must be >= 0", ranks=1),
    Case("check_every negative", ("run.check_every=-5",), "run.check_every must be >= 0", ranks=1),
    # Checkpoints that cannot be resumed from.
    Case("resume file missing", ("--resume", "/nonexistent/step-1.pt"), "no such checkpoint file"),
    Case("resume latest without checkpoint", ("--resume", "latest"), "--resume latest: no checkpoint in"),
    Case("every checkpoint corrupt", ("--resume", "auto"), "no valid checkpoint in", setup="all corrupt"),
    Case("checkpoint of another model", ("--resume", "auto"), "does not fit this model", setup="other model"),
    Case("manifest damaged", ("--resume", "auto"), "manifest.json is damaged", setup="bad manifest"),
    # Data that fails its HDF5 checksum (fletcher32) when read: the first chunk is read before step 0 (the features'
    # range), so the run stops before it claims its folder.
    Case("corrupt data chunk", (), "cannot read '/train/x' rows", setup="corrupt chunk"),
    # Faults during training: every rank ends, with the cause.
    Case(
        "NaN loss, policy abort",
        ("--fault", "nan@1:3"),
        "non-finite loss at step 3 on rank 1; first non-finite gradient: ",
        clean=False,
    ),
    Case(
        "exception on one rank",
        ("--fault", "raise@1:3"),
        "injected fault: raise on rank 1 at step 3",
        clean=False,
        tracebacks=1,  # a bug, not a user error: one traceback, from the rank that raised
    ),
    Case(
        "replicas diverge",
        ("--fault", "diverge@1:2", "run.check_every=2"),
        "replicas diverged at step 2: first differing tensor",
        clean=False,
    ),
    Case(
        "SIGUSR1 on one rank",
        ("--fault", "signal@1:3"),
        "stopped by SIGUSR1 at step 3",
        status=EXIT_REQUEUE,
        clean=False,
    ),
    Case(
        "hang on one rank",
        ("--fault", "hang@1:3", "run.watchdog_s=4"),
        "rank(s) 1 did not arrive at the step's communication",
        within_s=15,
        clean=False,
    ),
    Case(
        "hang in an evaluation",
        ("--fault", "hang-eval@1:1", "run.watchdog_s=4"),
        "watchdog: evaluation after epoch 1 did not finish within 4 s (run.watchdog_s) per batch; rank(s) 1 did not "
        "arrive at its communication (rank(s) 0 were waiting in it)",
        within_s=15,
        clean=False,
    ),
    Case(
        "hang in a checkpoint's write",
        ("--fault", "hang-save@0:4", "run.watchdog_s=4", "run.checkpoint_every=4"),
        "watchdog: checkpoint at step 4 did not finish within 4 s (run.watchdog_s); rank(s) 0 did not arrive at its "
        "communication (rank(s) 1 were waiting in it)",
        within_s=15,
        clean=False,
    ),
    Case("rank killed", ("--fault", "kill@1:3"), "signal 9", status=None, within_s=15, clean=False),
]

# A config value that cannot work: named at parse time by config.load, which every rank runs alike.
# test_faults_table checks each row in-process (config.load is pure Python: no launch proves more) and runs
# END_TO_END under mpiexec: the one line, the status, no run folder, as for every other row.
CONFIG_VALUES = [
    ("lr zero", "train.lr=0", "train.lr"),
    ("lr negative", "train.lr=-0.1", "train.lr"),
    ("lr nan", "train.lr=nan", "train.lr"),
    ("lr inf", "train.lr=inf", "train.lr"),
    ("lr not a number", "train.lr='fast'", "train.lr"),
    ("momentum negative", "train.momentum=-0.5", "train.momentum"),
    ("weight_decay negative", "train.weight_decay=-1", "train.weight_decay"),
    ("seed negative", "train.seed=-1", "train.seed"),
    ("seed too large", "train.seed=18446744073709551616", "train.seed"),
    ("epochs zero", "train.epochs=0", "train.epochs"),
    ("batch_size zero", "train.batch_size=0", "train.batch_size"),
    ("batch_size float", "train.batch_size=3.5", "train.batch_size"),
    ("batch_size bool", "train.batch_size=true", "train.batch_size"),
    ("optimizer unknown", "train.optimizer='lamb'", "train.optimizer = 'lamb' is not one of"),
    ("max_steps negative", "train.max_steps=-3", "train.max_steps"),
    ("bucket_mb zero", "parallel.bucket_mb=0", "parallel.bucket_mb"),
    ("bucket_mb nan", "parallel.bucket_mb=nan", "parallel.bucket_mb"),
    ("compression unknown", "parallel.compression='zip'", "parallel.compression = 'zip' is not one of"),
    ("accumulate_steps zero", "parallel.accumulate_steps=0", "parallel.accumulate_steps"),
    ("mode unknown", "parallel.mode='expert'", "parallel.mode = 'expert' is not one of"),
    ("stages zero", "parallel.stages=0", "parallel.stages"),
    ("micro_batches zero", "parallel.micro_batches=0", "parallel.micro_batches"),
    ("pipeline schedule unknown", "parallel.schedule='zigzag'", "parallel.schedule = 'zigzag' is not one of"),
    ("balance unknown", "parallel.balance='flops'", "parallel.balance = 'flops' is not one of"),
    ("model unknown", "model.name='transformer'", "model.name = 'transformer' is not one of"),
    ("hidden zero", "model.hidden=[0]", "model.hidden"),
    ("hidden negative", "model.hidden=[16, -4]", "model.hidden"),
    ("cell unknown", "model.cell='tcn'", "model.cell = 'tcn' is not one of"),
    ("dtype unknown", "model.dtype='int8'", "model.dtype = 'int8' is not one of"),
    ("factory malformed", "model.factory='nocolon'", "model.factory"),
    ("kwargs without factory", "model.kwargs={hidden = 3}", "model.kwargs"),
    ("partition unknown", "data.partition='random'", "data.partition = 'random' is not one of"),
    ("cache_mb negative", "data.cache_mb=-1", "data.cache_mb"),
    ("prefetch negative", "data.prefetch=-2", "data.prefetch"),
    ("data path empty", "data.path=''", "data.path"),
    ("watchdog_s text", "run.watchdog_s='soon'", "run.watchdog_s"),
    ("keep zero", "run.keep=0", "run.keep"),
    ("checkpoint_every negative", "run.checkpoint_every=-1", "run.checkpoint_every"),
    ("timing skip negative", "run.timing_skip_steps=-1", "run.timing_skip_steps"),
    ("loss unknown", "train.loss='hinge'", "train.loss = 'hinge' is not one of"),
    ("lr schedule unknown", "train.schedule='linear'", "train.schedule = 'linear' is not one of"),
    ("precision unknown", "train.precision='fp8'", "train.precision = 'fp8' is not one of"),
    ("clip negative", "train.clip_grad_norm=-1", "train.clip_grad_norm"),
    ("early stop without metric", "run.early_stop={patience = 2}", "run.early_stop needs a metric"),
    ("unknown key", "train.learning_rate=0.1", "unknown key 'train.learning_rate'"),
    ("unknown section", "optimiser.lr=0.1", "unknown section [optimiser]"),
    ("max_steps not a multiple", "train.max_steps=5", "train.max_steps must be a multiple"),
    # A key nothing reads in this setting: refused, not ignored.
    ("key of another mode", "parallel.local_steps=8", "parallel.local_steps = 8 takes effect only with parallel.mode"),
    ("momentum with adam", "train.momentum=0.5", "train.momentum = 0.5 takes effect only with"),  # digits-mlp: adam
    ("ramp without sparsity", "prune.start=5", "prune.start = 5 takes effect only with prune.final_sparsity > 0"),
]
END_TO_END = ("lr zero", "unknown key", "max_steps not a multiple")


def config_settings(name: str, setting: str) -> tuple[str, ...]:
    """The row's --set assignments (the multiple-of check needs accumulation on)."""
    return (setting, *(("parallel.accumulate_steps=2",) if "multiple" in name else ()))


CASES += [
    Case(name, config_settings(name, setting), message, ranks=1)
    for name, setting, message in CONFIG_VALUES
    if name in END_TO_END
]
CASES += [
    # The command line and config files themselves.
    Case("--set malformed", ("--set", "train.lr"), "--set expects section.key=value", ranks=1),
    Case("--threads zero", ("--threads", "0"), "--threads 0: must be >= 1", ranks=1),
    Case("config file missing", ("--config", "{tmp}/none.toml"), "config: file", ranks=1),
    Case("named config unknown", ("--config", "nosuch"), "is neither a file nor a named config", ranks=1),
    Case("config not TOML", ("--config", "{tmp}/conf.toml"), "is not valid TOML", ranks=1, setup="bad toml"),
    Case(
        "config unknown section", ("--config", "{tmp}/conf.toml"), "unknown section", ranks=1, setup="unknown section"
    ),
    # The layout: what the world's ranks can split, with what would work.
    Case("batch not divisible by ranks", ("train.batch_size=33",), "use a multiple of 2 (e.g. 32)"),
    Case(
        "stages need more ranks", ("parallel.mode='pipeline'", "parallel.stages=4"), "needs 4 ranks, but the job has 2"
    ),
    Case(
        "micro-batches do not split the batch",
        ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.micro_batches=5"),
        "use a multiple of 5 (e.g. 30)",
    ),
    Case(
        "more stages than layers",
        ("parallel.mode='pipeline'", "parallel.stages=2", "model.hidden=[]"),
        "use at most 1 stages",
    ),
    Case(
        "cuts out of range",
        ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.cuts=[9]"),
        "must be 1 increasing layer indices in 1..3",
    ),
    Case(
        "cuts count",
        ("parallel.mode='pipeline'", "parallel.stages=2", "parallel.cuts=[1, 2]"),
        "must name 1 layer indices",
    ),
    Case("tensor width", ("parallel.mode='tensor'", "parallel.tensor=2", "model.hidden=[15]"), "hidden width 15"),
    Case("stages in data mode", ("parallel.stages=2",), "parallel.stages = 2 takes effect only with parallel.mode"),
    Case(  # the run's metrics depend on its loss: checked with the model, not at parse time
        "early stop unknown metric",
        ("run.early_stop={metric = 'f1'}",),
        "run.early_stop.metric = 'f1' is not a metric",
        ranks=1,
    ),
    Case(
        "CNN on flat samples",
        ("parallel.mode='columns'", "model.name='cnn'"),
        "the CNN needs (channels, height, width)",
    ),
    # The model against the data, before step 0.
    Case(
        "factory raises", ("--config", "{tmp}/conf.toml"), "raised RuntimeError: out of ideas", setup="factory raises"
    ),
    Case(
        "factory returns no module",
        ("--config", "{tmp}/conf.toml"),
        "not a torch.nn.Module",
        setup="factory not a module",
    ),
    Case(
        "factory cannot be imported",
        ("--config", "{tmp}/conf.toml"),
        "cannot import 'nosuchmodule'",
        setup="factory missing",
    ),
    Case(
        "model outputs do not match classes",
        ("--config", "{tmp}/conf.toml"),
        "the model gives (7,) per sample, but the data has 4 classes",
        setup="factory wrong outputs",
    ),
    Case(
        "model inputs do not match features",
        ("--config", "{tmp}/conf.toml"),
        "the model does not take this data's samples",
        setup="factory wrong inputs",
    ),
    # The loss and fit's own parts against the model, before step 0.
    Case("loss is not a loss", ("train.loss='os:system'",), "train.loss = 'os:system' fails on outputs (2, 4)"),
    Case(
        "loss gives one value per sample",
        ("--config", "{tmp}/conf.toml"),
        "it returned a tensor of shape (2,) (use reduction='mean')",
        setup="loss per sample",
    ),
    Case(
        "fit optimizer makes no optimizer",
        (),
        "hpcdl.fit: optimizer must return a torch.optim.Optimizer, got int",
        script="{tmp}/fit.py",
        setup="fit optimizer",
    ),
    Case(
        "fit scheduler makes no scheduler",
        (),
        "hpcdl.fit: scheduler must return a torch LR scheduler stepped without a metric",
        script="{tmp}/fit.py",
        setup="fit scheduler",
    ),
    Case("model too large for memory", ("model.hidden=[200000, 200000]",), "the model needs about", ranks=1),
    # Data files that cannot be trained on.
    Case("data missing", ("data.path='{tmp}/nope.h5'",), "does not exist", ranks=1),
    Case("data is a folder", ("data.path='{tmp}'",), "is a directory, not an HDF5 file", ranks=1),
    Case("data not HDF5", (), "not an HDF5 file", setup="not hdf5"),
    Case("data empty file", (), "not an HDF5 file", setup="empty file"),
    Case("data missing /val", (), "/val", setup="missing val"),
    Case("data missing /train/x", (), "/train/x", setup="missing train x"),
    Case("data lengths differ", (), "200", setup="length mismatch"),
    Case("labels out of range", (), "label", setup="label out of range"),
    Case("labels negative", (), "label", setup="negative label"),
    Case("labels not integers", (), "/train/y", setup="float labels"),
    Case("features not floating point", (), "/train/x", setup="int features"),
    Case("features float64", (), "'/train/x' has dtype float64; x must be float32", setup="float64 features"),
    Case("num_classes missing", (), "num_classes", setup="no num_classes"),
    Case("NaN in /train with scan", ("data.scan=true",), "NaN", setup="nan train"),
    Case("Inf in /train with scan", ("data.scan=true",), "Inf", setup="inf train"),
    Case("NaN in /val", (), "/val", setup="nan val"),
    Case(  # the file is accepted unscanned; the per-step guard stops at the NaN's batch (one batch: all rows)
        "NaN in /train without scan",
        ("train.batch_size=200",),
        "non-finite loss at step 1",
        setup="nan train",
        clean=False,
    ),
    Case("fewer samples than a batch", (), "fewer than one global batch", setup="too few samples"),
    Case("external link to a missing file", (), "gone.h5", setup="external link"),
    Case("labels use few classes", ("train.max_steps=2",), "use 1 of num_classes = 4", status=0, setup="few labels"),
    # The run folder: one run at a time, nothing buried, every path writable.
    Case("fresh start over a run", (), "already holds a run", setup="previous run"),
    Case("run folder in use", (), "in use by another run", setup="locked"),
    Case("checkpoints is a file", (), "checkpoints is a file, not a folder", setup="checkpoints file"),
    Case("run.dir is a file", (), "is a file, not a folder", setup="run dir file"),
    Case(
        "run.dir inside a file",
        ("run.dir='{tmp}/data.h5/run'",),
        "run.dir {tmp}/data.h5/run lies inside {tmp}/data.h5, which is a file, not a folder",
        setup="file in run.dir's path",
    ),
    Case("resume with another seed", ("--resume", "auto", "train.seed=5"), "train.seed: 0 -> 5", setup="previous run"),
    # The newest checkpoint altered: skipped with its reason, the previous one used (documented success).
    Case(
        "newest checkpoint of random bytes",
        ("--resume", "auto"),
        "is not valid (checksum mismatch",
        status=0,
        setup="random checkpoint",
        clean=False,
    ),
    Case("resume path is a folder", ("--resume", "{tmp}"), "no checkpoint in", ranks=1),
    # Nothing accepted that does nothing, every output checked before the work, nothing partial after a failure.
    Case("config file not text", ("--config", "{tmp}/conf.toml"), "is not a text file", ranks=1, setup="binary config"),
    Case("trace cannot be created", ("--trace", "/proc/hpcdl.json"), "--trace /proc/hpcdl.json: cannot create a file"),
    Case(
        "trace file exists",
        ("--trace", "{tmp}/conf.toml"),
        "conf.toml already exists; pass --overwrite",
        ranks=1,
        setup="bad toml",
    ),  # fmt: skip
    Case(
        "prune ramp after the run",
        ("prune.final_sparsity=0.5", "prune.start=900", "prune.end=990"),
        "prune.start = 900: the run ends at step",
        ranks=1,
    ),  # fmt: skip
    # A fresh run that fails before its first checkpoint leaves no run folder: the corrected rerun just starts.
    Case("NaN at the first step", ("--fault", "nan@0:1"), "non-finite loss at step 1 on rank 0"),
]
