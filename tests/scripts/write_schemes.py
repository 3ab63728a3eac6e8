"""The measurement behind hpcdl/infer/writer.py's choice (run by hand, not by the tests).

    mpiexec -n R python tests/scripts/write_schemes.py ROWS CLASSES FOLDER

Every rank holds the results of every R-th chunk of 1024 rows (as a dynamic schedule leaves them): index (int64),
probs and logits (float32, CLASSES each). Two ways to one complete HDF5 file, fsync included, 3 rounds each:
`offsets`: rank 0 lays the file out (contiguous datasets allocated at creation) and every rank pwrites its rows;
`gather`: every rank sends its chunks to rank 0, which writes them through h5py. Rank 0 prints the times.
"""

import os
import sys
import time

import h5py
import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
rows, classes, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
CHUNK = 1024
chunks = [(a, min(a + CHUNK, rows)) for a in range(0, rows, CHUNK)]
rng = np.random.default_rng(rank)
mine = {
    a: [np.arange(a, b, dtype=np.int64)] + [rng.standard_normal((b - a, classes)).astype(np.float32)] * 2
    for a, b in chunks[rank::size]
}
SHAPES = [("index", (rows,), np.int64), ("probs", (rows, classes), np.float32), ("logits", (rows, classes), np.float32)]


def lay_out(path: str) -> list[int]:
    with h5py.File(path, "w") as file:
        offsets = []
        for name, shape, dtype in SHAPES:
            plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            offsets.append(file.create_dataset(name, shape, dtype, dcpl=plist).id.get_offset())
    return offsets


def at_offsets(path: str) -> None:
    offsets = comm.bcast(lay_out(path) if rank == 0 else None)
    fd = os.open(path, os.O_WRONLY)
    for start, arrays in mine.items():
        for offset, array in zip(offsets, arrays):
            os.pwrite(fd, array.tobytes(), offset + start * array[0].nbytes if array.ndim > 1 else offset + start * 8)
    os.fsync(fd)
    os.close(fd)


def gathered(path: str) -> None:
    if rank != 0:
        for start, arrays in mine.items():
            comm.send((start, arrays), dest=0)
        return
    with h5py.File(path, "w") as file:
        datasets = [file.create_dataset(name, shape, dtype) for name, shape, dtype in SHAPES]
        received = [comm.recv(source=MPI.ANY_SOURCE) for _ in range(len(chunks) - len(mine))]
        for start, arrays in [*mine.items(), *received]:
            for dataset, array in zip(datasets, arrays):
                dataset[start : start + len(array)] = array
        file.flush()
        os.fsync(file.id.get_vfd_handle())


for _ in range(3):
    for name, write in (("offsets", at_offsets), ("gather", gathered)):
        comm.Barrier()
        began = time.perf_counter()
        write(os.path.join(folder, f"write-schemes-{name}.h5"))
        comm.Barrier()
        if rank == 0:
            print(f"{name:8} {rows:,} rows x {classes} classes, {size} ranks: {time.perf_counter() - began:.3f} s")
