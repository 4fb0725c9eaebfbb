"""Shared test settings.

Tests run tiny models, where torch's intra-op threads cost more than they give, and several tests
start subprocesses (2-process runs, CLI runs) that would oversubscribe a 2-core machine: every
test process and its children use one thread.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
