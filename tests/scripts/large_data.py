"""Train on a file larger than the cache budget; check every sample was read once; report memory.

Run under mpiexec: `python tests/scripts/large_data.py CONFIG [section.key=value ...]`. It runs
the real `hpcdl.train.train`, noting the first two features of every training row each rank's
loader delivers (a sample's fingerprint), then rank 0 compares the multiset of fingerprints
of each epoch with the file's and prints one JSON line with the per-rank resident memory.
"""

import json
import resource
import sys
import time

import h5py
import numpy as np

from hpcdl import comm, config
from hpcdl.data import loader
from hpcdl.data.schema import SCAN_READ_BYTES, row_blocks
from hpcdl.train import train


def resident_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def fingerprint(rows: np.ndarray) -> np.ndarray:
    """The bits of a row's first two float32 features as one int64: distinct for distinct samples."""
    return np.ascontiguousarray(rows[:, :2]).view(np.int64).ravel()


def main() -> None:
    world = comm.init(threads=1)
    cfg = world.agree(lambda: config.load(sys.argv[1], sys.argv[2:]))
    fingerprints: list[np.ndarray] = []
    deliver = loader.Loader._load

    def recording(self, plan):
        batch = deliver(self, plan)
        if self.reader.split == "train":
            fingerprints.append(fingerprint(batch.x.numpy()))
        return batch

    loader.Loader._load = recording
    before = resident_mb()
    began = time.perf_counter()
    summary = train(cfg, world)
    elapsed = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    seen = np.concatenate(fingerprints)
    everything = world.comm.gather(seen, root=0)
    memory = world.comm.gather({"before_mb": round(before, 1), "peak_mb": round(peak, 1)}, root=0)
    if not world.is_root:
        return
    with h5py.File(cfg.data.path, "r") as f:
        x = f["train/x"]
        column = np.concatenate([fingerprint(x[a:b, :2]) for a, b in row_blocks(x, SCAN_READ_BYTES)])
    epochs = cfg.train.epochs
    merged = np.sort(np.concatenate(everything))
    expected = np.sort(np.tile(column, epochs))
    print(
        json.dumps(
            {
                "every_sample_once_per_epoch": bool(np.array_equal(merged, expected)),
                "fingerprints_unique": bool(len(np.unique(column)) == len(column)),
                "samples_read": int(len(merged)),
                "train_samples": int(len(column)),
                "epochs": epochs,
                "ranks": world.size,
                "memory": memory,
                "elapsed_s": round(elapsed, 1),
                "ms_per_step": summary["ms_per_step"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
