"""Collection settings shared by the test sessions.

Each tests session installs one backend; the PyTorch kernel module imports
torch at the top, so its doctests are collected only where torch is installed.
The griffe extension of the docs build imports griffe, which only the docs
session installs.
"""

import importlib.util

collect_ignore = [
    path
    for path, needs in (
        ("kmask/ops/_torch.py", "torch"),
        ("tools/griffe_examples.py", "griffe"),
    )
    if not importlib.util.find_spec(needs)
]
