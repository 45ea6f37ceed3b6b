"""tests/cuda holds what only a GPU can show; without one it is not collected at all (the session
header says so), rather than listing one skip per test."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
