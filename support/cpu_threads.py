"""How torch's CPU threads wait between operators; every script imports this first, before torch starts.

torch runs its CPU operators on GNU OpenMP threads. A thread that finishes
its share of an operator spins, checking for the next one, GOMP_SPINCOUNT
times before it sleeps: 300,000 by default. On a quiet machine that saves a
wake-up. With another process on one of the cores, the spinning thread takes
the time slices that the thread still working needs, and every operator
waits for the slowest. Measured on a 2-core CPU with one other CPU-bound
process (docs/performance.md), against the same work on a quiet machine:

    GOMP_SPINCOUNT          full fine-tuning step   head-only epoch (a frozen backbone)
    300,000 (the default)   4.9x to 6.6x slower     4.7x to 28x slower
    5,000 (set here)        1.9x to 2.2x slower     1.9x to 2.0x slower

Fair sharing of 2 cores would be 2x. On a quiet machine 5,000 costs the
full step 1.6%, within bench.py's noise. Spinning less costs more: 1,000
made the quiet step 26% slower, and OMP_WAIT_POLICY=PASSIVE (no spinning)
38%. A value the user sets, for either variable, wins. The thread count is
left alone: it changes the gradients' rounding, and a run's numbers would
then depend on what else the machine was doing.
"""

import os

SPIN_COUNT = "5000"

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
