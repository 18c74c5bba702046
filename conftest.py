"""Collection settings shared by the test sessions.

Each tests session installs one backend; the PyTorch kernel module imports
torch at the top, so its doctests are collected only where torch is installed,
and `kmask.keras_hub` only where keras-hub imports. The griffe extension of
the docs build imports griffe, which only the docs session installs.
"""

import importlib.util


def _imports(name: str) -> bool:
    """Whether `name` is installed and imports: keras-hub 0.32 is installed
    on keras-nightly too, where it does not import."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


collect_ignore = [
    path
    for path, needs in (
        ("kmask/ops/_torch.py", "torch"),
        ("kmask/ops/_torch_ctc.py", "torch"),
        ("tools/griffe_examples.py", "griffe"),
    )
    if not importlib.util.find_spec(needs)
]
if not _imports("keras_hub"):
    collect_ignore.append("kmask/keras_hub.py")
