"""Every bad input and fault tried against `hpcdl train`, with the message and exit status expected.

Each row is one run under mpiexec (test_faults_table.py). `setup` names a prepared state of
the run folder or data (see SETUPS there); `status` None means "any non-zero" (a killed rank's
status is the launcher's); `within_s` bounds the time from the fault's injection to the end of the job;
`clean` means one line on stderr and no run folder left behind (nothing partial).
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
    within_s: float | None = None
    clean: bool = True


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
    # Data that fails its HDF5 checksum (fletcher32) when read.
    Case("corrupt data chunk", (), "cannot read /train rows", setup="corrupt chunk"),
    # Faults during training: every rank ends, with the cause.
    Case(
        "NaN loss, policy abort",
        ("--fault", "nan@1:3"),
        "non-finite loss at step 3 on rank 1; first non-finite gradient: ",
        clean=False,
    ),
    Case("exception on one rank", ("--fault", "raise@1:3"), "injected fault: raise on rank 1 at step 3", clean=False),
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
    Case("rank killed", ("--fault", "kill@1:3"), "signal 9", status=None, within_s=15, clean=False),
]
