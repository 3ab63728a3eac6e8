"""Starting MPI once per process: launch checks (singletons, a launcher gone), the node layout, threads per rank,
and the process's one World."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from hpcdl.comm.failure import EXIT_ERROR, abort_on_exception, wait_for_all
from hpcdl.comm.library import library_version, mpi
from hpcdl.comm.world import World

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
    library = " ".join(library_version().split())
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
    """Start MPI once and return this rank's World; an uncaught exception on any rank then ends every rank.

    The World has `rank`, `size`, `local_rank`, `local_size`, `node`, `num_nodes`, `split(color)` for
    sub-communicators, `log(message)` (rank 0 speaks), `agree(fn)` (run fn everywhere; if it fails anywhere,
    every rank exits with its message), a method for each collective and point-to-point operation hpcdl uses,
    and `comm` (the mpi4py communicator, for your own MPI calls).

    It also sets torch's threads per rank, refuses a launch that made singletons (see `check_launch`), ends
    the rank if its launcher goes away, and exports RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE.
    Later calls return the same World (the first call's arguments count, except that `verbose` and `threads`
    given later still apply): the command line, `hpcdl.init`, `hpcdl.horovod.init` and `hpcdl.Pipeline` all
    share it.
    """
    global _WORLD
    if _WORLD is None:
        MPI = mpi()
        comm = MPI.COMM_WORLD
        check_launch(comm.Get_size())
        sys.excepthook = abort_on_exception
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
