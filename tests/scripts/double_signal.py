"""A second stop signal before and after the stop's checkpoint: `python tests/scripts/double_signal.py before|after`.

The process sends itself SIGTERM twice. `after` calls `StopSignals.checkpointed(line)` between the two,
as the training loop does once the stop's checkpoint is written: the rank must then still say the
checkpoint's line and exit with 75; `before` must end at once with 128 + SIGTERM.
"""

import os
import signal
import sys
import time

from hpcdl.resilience import StopSignals

signals = StopSignals()
signals.install()
os.kill(os.getpid(), signal.SIGTERM)
while not signals.received:
    time.sleep(0.01)
if sys.argv[1] == "after":
    signals.checkpointed("hpcdl: stopped by SIGTERM at step 3; checkpoint run/checkpoints/step-00000003.pt")
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
sys.exit(0)  # not reached: the second signal ends the process
