"""Same-work performance comparisons of capfilt's model paths against the stock way (`make bench`).

OpenMP threads that wait by spinning (libgomp's default) collapse when other processes share the
cores: a parallel region waits a whole scheduler slice for a descheduled sibling, and the spinning
is charged as CPU time. Unless the caller chose a policy, the benchmarks let waiting threads sleep;
this must happen before torch is imported, hence here. Both sides of every comparison run with it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
