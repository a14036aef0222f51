"""Suite-wide settings.

One intra-op thread per process: the test models are tiny, so a second thread only adds
synchronisation, and on a shared 2-core machine it waits for other processes (measured: 9 ms vs
106 ms per step under load). Subprocesses (the app, DDP ranks) inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
