"""hpcdl: MPI-parallel deep learning on HDF5 data, from a laptop to a Slurm cluster."""

__version__ = "0.1.0"
