"""How torch's CPU threads wait between operators; every script imports this first, before torch starts.

torch runs its CPU operators on GNU OpenMP threads. A thread that finishes
its share of an operator spins, checking for the next one, GOMP_SPINCOUNT
times before it sleeps: 300,000 by default. On a quiet machine that saves a
wake-up. With another process on one of the cores, the spinning thread takes
the time slices that the thread still working needs, and every operator
waits for the slowest. 5,000 spins keep nearly all of the quiet machine's
speed and let a shared one run at about the speed fair sharing gives
(docs/performance.md has the measurements, and those of the alternatives).
A value the user sets, for either variable, wins. The thread count is left
alone: it changes the gradients' rounding, and a run's numbers would then
depend on what else the machine was doing.
"""

import os

SPIN_COUNT = "5000"

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
