"""The MPI world: who this rank is, how it talks, and how an error ends every rank."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
import torch

from hpcdl.errors import HpcdlError, TrialFailed

T = TypeVar("T")

# Exit status of a job ended by an error (bad input, exception on any rank).
EXIT_ERROR = 2
# Exit status of a job stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: requeue me).
EXIT_REQUEUE = 75
# Seconds between printing an abort's cause and MPI_Abort, so the launcher forwards the line first.
ABORT_GRACE_S = 0.3
# Seconds a rank other than 0 waits before it reports an error that rank 0 may be reporting too:
# rank 0's abort usually ends it first, so the job shows one message, not one per rank.
PEER_DELAY_S = 1.0
# The set-up limit: how long a start-up collective waits for ranks that never come (0 = forever).
SETUP_TIMEOUT_ENV, SETUP_TIMEOUT_S = "HPCDL_SETUP_TIMEOUT_S", 60.0
# Tag of the notes "I have arrived" that ranks send rank 0 at a start-up collective (see wait_for_all).
ARRIVED_TAG = 30917
# How many processes a launcher started, in the variables it sets (an MPI launcher's own, torchrun's,
# Slurm's step and allocation); on a tie the first named is reported.
LAUNCHED_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
# The MPI launchers' own: set for this very launch, they outrank the others (see check_launch).
MPI_LAUNCHED_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
# Variables an MPI launcher sets in every rank it starts (hydra and srun's PMI, PMIx, Open MPI).
MPI_LAUNCHED = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
# Each launcher's index of the process it started, read when MPI sees a singleton (the same order as above).
LAUNCHED_INDEXES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK", "SLURM_PROCID", "SLURM_PROCID")
SINGLETON_WAIT_S = 5.0  # how long the other singletons leave the refusal to process 0 before they end too
LAUNCHER_POLL_S = 0.5  # how often a rank looks whether its launcher is still there


def mpi():
    """The mpi4py MPI module, imported on first use."""
    # Imported lazily so that single-process commands (data make, info) work without MPI.
    from mpi4py import MPI

    return MPI


@dataclass
class World:
    """This rank's place in the job: communicator, rank, size and node-local layout."""

    comm: object
    rank: int
    size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int
    verbose: bool = False
    hosts: tuple[str, ...] = ()  # each rank's host name, for messages that must say where a rank runs
    # A contained world (a sweep's group): a failure its ranks agree on raises TrialFailed on each of them
    # instead of ending the process, so the group can go on to other work.
    contained: bool = False

    def where(self, rank: int) -> str:
        """' on HOST' for a rank of a job that spans hosts, else '' (one host needs no naming)."""
        return f" on {self.hosts[rank]}" if len(set(self.hosts)) > 1 else ""

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that speaks and writes files."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print from rank 0; other ranks print only when verbose, prefixed with their rank."""
        if self.is_root:
            print(message, flush=True)
        elif self.verbose:
            print(f"[rank {self.rank}] {message}", flush=True)

    def split(self, color: int, key: int | None = None) -> World:
        """A sub-world of the ranks sharing `color` (ordered by `key`, default rank)."""
        sub = self.comm.Split(color, self.rank if key is None else key)
        return World(
            sub,
            sub.Get_rank(),
            sub.Get_size(),
            self.local_rank,
            self.local_size,
            self.node,
            self.num_nodes,
            self.verbose,
            tuple(sub.allgather(self.hosts[self.rank])) if self.hosts else (),
        )

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum of a float64 vector over all ranks."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Elementwise maximum of a vector over all ranks."""
        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=mpi().MAX)
        return out

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails anywhere, end every rank with the first cause.

        This is the gate before the first collective that depends on input: every
        rank reaches the same allgather, so a failure on one rank cannot leave the
        others waiting in a later collective. A rank that never calls it (code that runs
        on some ranks only) ends the job after the set-up limit instead of hanging it.
        """
        wait_for_all(self.comm, f"World.agree (called from {sys._getframe(1).f_code.co_qualname})")
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported as one line (with its type unless ours), then every rank exits
            error = str(exc) if isinstance(exc, HpcdlError) else f"{type(exc).__name__}: {exc}"
            if self.verbose:  # --verbose: where it came from, for a bug report
                traceback.print_exception(exc)
        errors = self.comm.allgather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            if self.contained:
                raise TrialFailed(message)
            if self.is_root:
                # The same message from every rank is one cause, not one rank's.
                where = f" (rank {rank})" if self.size > 1 and len(set(errors)) > 1 else ""
                print(f"hpcdl: error{where}: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_ERROR)
        return result

    def fail_all(self, message: str) -> NoReturn:
        """End every rank with `message`: for a verdict every rank reached at the same point (see `agree`)."""
        self.agree(lambda: _raise(HpcdlError(message)))
        raise AssertionError("agree returns only when nothing failed")  # pragma: no cover


def _raise(error: Exception) -> NoReturn:
    raise error


def abort(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """End the whole job from one rank, for the unexpected: print the cause, then MPI_Abort (never a hang)."""
    MPI = mpi()
    rank = MPI.COMM_WORLD.Get_rank()
    prefix = f"hpcdl: error (rank {rank})" if MPI.COMM_WORLD.Get_size() > 1 else "hpcdl: error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    # The launcher forwards output asynchronously and drops what is pending when it kills the job.
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)


def _abort_on_exception(exc_type, exc, tb) -> None:
    # An uncaught exception on one rank would leave the others in a collective forever.
    if mpi().COMM_WORLD.Get_rank() != 0:
        time.sleep(PEER_DELAY_S)  # a bug often strikes every rank: one traceback, rank 0's
    if issubclass(exc_type, HpcdlError):
        abort(str(exc))
    if issubclass(exc_type, KeyboardInterrupt):
        abort("interrupted by SIGINT outside the training loop (nothing to checkpoint there)")
    traceback.print_exception(exc_type, exc, tb)
    abort(f"{exc_type.__name__}: {exc}")


def setup_timeout_s() -> float:
    """The set-up limit in seconds: HPCDL_SETUP_TIMEOUT_S, default 60; 0 waits forever."""
    value = os.environ.get(SETUP_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else SETUP_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise HpcdlError(f"{SETUP_TIMEOUT_ENV}={value!r} must be a number of seconds >= 0 (0 waits forever)")
    return seconds


def wait_for_all(comm, what: str) -> None:
    """Return once every rank of `comm` has reached `what`; end the job if some do not within the set-up limit.

    A non-blocking barrier, polled against a deadline: a rank that never comes (code that
    runs on some ranks only, a rank stopped at start-up) would hold every other rank in the
    next blocking collective forever. Each rank also sends rank 0 a note on arrival, so that
    rank 0 can name who came and who did not.
    """
    limit, size = setup_timeout_s(), comm.Get_size()
    if size == 1 or limit == 0:
        return
    MPI, rank = mpi(), comm.Get_rank()
    notes = np.zeros(size, dtype=np.uint8)
    if rank == 0:
        arrivals = [comm.Irecv([notes[r : r + 1], MPI.BYTE], source=r, tag=ARRIVED_TAG) for r in range(1, size)]
    else:
        arrivals = [comm.Isend([notes[:1], MPI.BYTE], dest=0, tag=ARRIVED_TAG)]
    barrier = comm.Ibarrier()
    # Rank 0 names who came; the others wait a little longer, so that its line usually ends the job.
    deadline = time.monotonic() + limit + (0 if rank == 0 else max(PEER_DELAY_S, limit / 10))
    pause = 1e-4
    while not barrier.Test():
        if time.monotonic() > deadline:
            came = [0, *(r for r, note in enumerate(arrivals, 1) if note.Test())] if rank == 0 else None
            abort(_setup_timeout_message(what, limit, size, came))
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    MPI.Request.Waitall(arrivals)


def _setup_timeout_message(what: str, limit: float, size: int, came: list[int] | None) -> str:
    """The one line of a set-up timeout: who came (as rank 0 knows it), and the likely causes."""
    causes = (
        "is every rank running the same code? (e.g. hpcdl.fit called on rank 0 only); "
        f"a rank still busy (or a slow start) needs {SETUP_TIMEOUT_ENV} set higher"
    )
    if came is None:
        return f"set-up: not every rank reached {what} within {limit:g} s, and rank 0 did not say who; {causes}"
    missing = [r for r in range(size) if r not in came]
    return (
        f"set-up: only rank(s) {rank_ranges(came)} of {size} reached {what} within {limit:g} s; "
        f"rank(s) {rank_ranges(missing)} did not; {causes}"
    )


def rank_ranges(ranks: list[int]) -> str:
    """Sorted ranks as ranges, e.g. [0, 1, 2, 5] -> '0-2, 5' (a line stays short at thousands of ranks)."""
    parts: list[list[int]] = []
    for rank in sorted(ranks):
        if parts and parts[-1][1] == rank - 1:
            parts[-1][1] = rank
        else:
            parts.append([rank, rank])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def check_launch(size: int) -> None:
    """End this process if its launcher started several processes that MPI sees as jobs of one rank each.

    srun with an MPI plugin that does not match the MPI library, torchrun or a plain loop
    starts N singletons: each would train alone and write the same run folder.
    """
    if size > 1:
        return
    counts = {name: int(os.environ[name]) for name in LAUNCHED_SIZES if os.environ.get(name, "").isdigit()}
    # An MPI launcher's count describes this launch: `mpiexec -n 1` inside an allocation sets PMI_SIZE=1, and
    # the SLURM_NTASKS it inherited must not turn it into a refused singleton. Without one, the largest count:
    # a stale "1" inherited from a parent (hpcdl.init exports WORLD_SIZE) must not hide the N that srun or
    # torchrun set for this very launch.
    own = [name for name in MPI_LAUNCHED_SIZES if name in counts]
    name = own[0] if own else max(counts, key=counts.get, default=None)
    started = counts.get(name, 1)
    if started <= 1:
        return
    if os.environ.get(LAUNCHED_INDEXES[LAUNCHED_SIZES.index(name)], "0") != "0":
        # Only process 0 says it, so the job's log has one line. srun --kill-on-bad-exit ends the others
        # with SIGTERM when process 0 exits; they exit with the same status, so the step's status is the
        # refusal's and not the signal's, and one that wakes first cannot end process 0 before it speaks.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_ERROR))
        time.sleep(SINGLETON_WAIT_S)
        sys.exit(EXIT_ERROR)
    library = " ".join(mpi().Get_library_version().splitlines()[0].split())
    print(
        f"hpcdl: error: the launcher started {started} processes ({name}={started}) but MPI sees each as a job "
        f"of 1 rank: they would train {started} separate copies into one folder; launch through MPI: "
        f"`srun --mpi=pmi2` (or pmix; `srun --mpi=list`) or `mpirun -n {started}` of the MPI mpi4py uses ({library})",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(EXIT_ERROR)


def watch_launcher(rank: int, size: int) -> None:
    """End this rank when the launcher process that started it is gone, rather than train on headless."""
    if size == 1 and not any(name in os.environ for name in MPI_LAUNCHED):
        return  # started by hand: its parent is a shell, whose end need not end the run
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is adopted by init or a subreaper
            time.sleep(LAUNCHER_POLL_S)
        line = f"hpcdl: error (rank {rank}): the launcher that started it (pid {parent}) is gone; ending the rank"
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            pass  # the output went through the launcher
        os._exit(EXIT_ERROR)

    threading.Thread(target=watch, name="hpcdl-launcher", daemon=True).start()


def _node_layout(comm) -> tuple[int, int, int, int, tuple[str, ...]]:
    """(local_rank, local_size, node index, number of nodes, each rank's host) from a shared-memory split."""
    MPI = mpi()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, comm.Get_rank())
    local_rank, local_size = local.Get_rank(), local.Get_size()
    leaders = comm.Split(0 if local_rank == 0 else MPI.UNDEFINED, comm.Get_rank())
    node = comm.Get_rank() if local_rank == 0 else 0
    if leaders != MPI.COMM_NULL:
        node = leaders.Get_rank()
        num_nodes = leaders.Get_size()
        leaders.Free()
    else:
        num_nodes = 0
    node = local.bcast(node, root=0)
    num_nodes = comm.allreduce(num_nodes, op=MPI.MAX)
    local.Free()
    hosts = tuple(comm.allgather(MPI.Get_processor_name()))
    return local_rank, local_size, node, num_nodes, hosts


def threads_per_rank(local_size: int) -> int:
    """Cores this rank owns: Slurm's cpus-per-task, else its CPU binding, else node cores / ranks on it."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return max(1, int(slurm))
    cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if allowed < cores:
        return allowed  # the launcher bound this rank to its own cores
    return max(1, cores // max(1, local_size))


_WORLD: World | None = None  # the one World of this process (see init)


def init(verbose: bool = False, threads: int | None = None) -> World:
    """Start MPI once per process, find this rank's place, set torch threads, and make errors end every rank.

    Refuses a launch that made singletons (see `check_launch`), ends the rank if its
    launcher goes away, and exports RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE.

    Later calls return the same World (the first call's arguments count, except that
    `verbose` and `threads` given later still apply): the command line, `hpcdl.init`,
    `hpcdl.horovod.init` and `hpcdl.Pipeline` all share it.
    """
    global _WORLD
    if _WORLD is None:
        MPI = mpi()
        comm = MPI.COMM_WORLD
        check_launch(comm.Get_size())
        sys.excepthook = _abort_on_exception
        watch_launcher(comm.Get_rank(), comm.Get_size())
        wait_for_all(comm, "hpcdl's start-up (hpcdl.init)")
        local_rank, local_size, node, num_nodes, hosts = _node_layout(comm)
        torch.set_num_threads(threads or threads_per_rank(local_size))
        rank, size = comm.Get_rank(), comm.Get_size()
        _WORLD = World(comm, rank, size, local_rank, local_size, node, num_nodes, verbose, hosts)
        # For libraries that find their place from the environment, as under torchrun.
        os.environ.update(
            RANK=str(_WORLD.rank), WORLD_SIZE=str(_WORLD.size),
            LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size),
        )  # fmt: skip
        return _WORLD
    if threads:
        torch.set_num_threads(threads)
    _WORLD.verbose = _WORLD.verbose or verbose
    return _WORLD


# torch dtype -> name of the MPI datatype that carries it. The one dtype map: every module asks `mpi_type`.
# bfloat16 travels as 16-bit words: MPI has no bfloat16 arithmetic, so it can be moved but not summed.
_MPI_TYPES = {
    torch.float64: "DOUBLE",
    torch.float32: "FLOAT",
    torch.float16: "FLOAT16_T",
    torch.bfloat16: "INT16_T",
    torch.int64: "INT64_T",
    torch.int32: "INT32_T",
    torch.int16: "INT16_T",
    torch.int8: "INT8_T",
    torch.uint8: "UINT8_T",
    torch.bool: "C_BOOL",
}
# Floating dtypes MPI can sum as they are; others are summed in a wider type by the caller.
SUMMABLE = (torch.float64, torch.float32, torch.float16)


def mpi_type(dtype: torch.dtype):
    """The MPI datatype that carries tensors of `dtype` (bfloat16 as raw 16-bit words)."""
    name = _MPI_TYPES.get(dtype)
    kind = getattr(mpi(), name, None) if name else None
    if kind is None or kind == mpi().DATATYPE_NULL:
        raise HpcdlError(f"tensors of dtype {dtype} cannot travel through MPI here (supported: {_supported()})")
    return kind


def _supported() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in _MPI_TYPES)


def as_buffer(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A contiguous tensor's memory for MPI without a copy (bfloat16 as its bits): a numpy view of a CPU tensor;
    a GPU tensor itself, which mpi4py reads through `__cuda_array_interface__` (only for CUDA-aware MPI:
    others get host copies from `hpcdl.device.Transport`)."""
    if not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous tensors")
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the bits; only valid for copies, not reductions.
        tensor = tensor.view(torch.int16)
    return tensor.detach() if tensor.is_cuda else tensor.numpy()


def buffer(tensor: torch.Tensor) -> list:
    """[memory, MPI datatype] of a contiguous tensor: what mpi4py's upper-case calls take."""
    return [as_buffer(tensor), mpi_type(tensor.dtype)]
