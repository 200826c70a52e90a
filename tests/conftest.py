import os

# Keep the 2-core machines responsive: one intra-op thread per test process (each spawned rank
# inherits this); torch otherwise starts one thread per core in every process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
