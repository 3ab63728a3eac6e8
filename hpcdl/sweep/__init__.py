"""Task-parallel sweeps: many trainings in one MPI job, the world split into groups on sub-communicators.

`space.py` lists the trials (grid or seeded random search), `runner.py` hands them to groups and trains
each with the one training engine on its group's contained world (a trial's agreed failure ends the trial,
not the job), `report.py` ranks the results and draws them, `commands.py` is `hpcdl sweep`.
"""
