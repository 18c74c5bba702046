"""The quickstarts' programs, read from the pages that show them.

Each page under `docs/quickstart/` shows one whole program in a code block
titled with its file name (```` ```python title="pad_value.py" ````). The
tests run each under the current backend (`tests/test_quickstarts.py`); the
`package` session runs one in a fresh virtualenv with the built wheel.

    python -m tools.quickstarts OUTDIR    # writes OUTDIR/pad_value.py, ...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tools.backends import REPOSITORY

PAGES = REPOSITORY / "docs" / "quickstart"
PROGRAM = re.compile(
    r'^```python title="(?P<name>\w+\.py)"\n(?P<source>.*?)^```$',
    re.MULTILINE | re.DOTALL,
)
MAX_LINES = 40  # a quickstart a reader takes in at a glance


def programs(pages: Path = PAGES) -> dict[str, str]:
    """Each page's program, by file name. A page with no titled block or with
    more than one is a `ValueError`."""
    found = {}
    for page in sorted(pages.glob("*.md")):
        blocks = PROGRAM.findall(page.read_text())
        if len(blocks) != 1:
            raise ValueError(
                f"{page.name} shows {len(blocks)} titled programs; expected 1"
            )
        ((name, source),) = blocks
        found[name] = source
    return found


def main(argv: list[str]) -> int:
    (outdir,) = argv
    Path(outdir).mkdir(parents=True, exist_ok=True)
    for name, source in programs().items():
        (Path(outdir) / name).write_text(source)
        print(Path(outdir) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
