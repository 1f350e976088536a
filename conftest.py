"""Settings shared by the tests (``tests/``) and the docstring examples collected under ``src/``."""

import os

# one thread: the tests and examples use tiny data, where more threads only compete for cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
