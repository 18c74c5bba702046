"""A griffe extension for the API reference (`mkdocs.yml`): reads a Keras-style
`Example:` section as the Google style's `Examples:` section.

Keras writes `Example:` with the doctest unindented below it; griffe knows only
`Examples:` (an indented block), so without this the doctest renders as an
admonition whose `>>>` lines Markdown takes for nested blockquotes. Parsed as
examples, every `>>>` block renders as highlighted code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# A Google-style section title at the docstring's own indentation ("Args:").
SECTION_TITLE = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")
EXAMPLE_TITLES = ("Example:", "Examples:")
INDENT = "    "


def examples_section(docstring: str) -> str:
    """`docstring` with each unindented `Example:` block turned into an
    indented `Examples:` section (up to the next section title)."""
    rewritten: list[str] = []
    in_example = False
    for line in docstring.splitlines():
        if line.strip() in EXAMPLE_TITLES and not line.startswith(" "):
            in_example = True
            rewritten.append("Examples:")
            continue
        if in_example and SECTION_TITLE.match(line):
            in_example = False
        # Google's section body starts on the line after its title.
        if in_example and not line.strip() and rewritten[-1] == "Examples:":
            continue
        # Doctest output may itself start with spaces (a NumPy array's
        # second row): every line of the block moves by the same indent.
        rewritten.append(INDENT + line if in_example and line.strip() else line)
    return "\n".join(rewritten)


class KerasExamples(griffe.Extension):
    """Rewrites the docstring of every object griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = examples_section(obj.docstring.value)
