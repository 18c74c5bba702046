"""Collection settings shared by the test sessions.

Each tests session installs one backend; the PyTorch kernel module imports
torch at the top, so its doctests are collected only where torch is installed.
"""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["kmask/ops/_torch.py"]
