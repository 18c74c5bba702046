"""The API reference (docs/api/*.md, built by `nox -s docs`) names every
public name of kmask, so a new name cannot land undocumented."""

from __future__ import annotations

import re

import pytest

import kmask
from tools.backends import REPOSITORY

API = REPOSITORY / "docs" / "api"


@pytest.mark.skipif(
    not API.is_dir(), reason="the docs are not beside an installed wheel's tests"
)
def test_every_public_name_has_an_api_entry():
    text = "\n".join(path.read_text() for path in sorted(API.glob("*.md")))
    # A member line (`- name`) or a directive of its own (`::: kmask.x.name`).
    members = set(re.findall(r"^\s*- (\w+)\s*$", text, re.MULTILINE))
    directives = {
        path.rsplit(".", 1)[-1]
        for path in re.findall(r"^::: ([\w.]+)", text, re.MULTILINE)
    }
    # `kmask.__version__` has a section of its own on the typing page.
    named = set(re.findall(r"`kmask\.(\w+)`", text))
    missing = sorted(set(kmask.__all__) - members - directives - named)
    assert not missing, f"not in docs/api/*.md: {missing}"
