"""The issue-20 switches (minillm/optim/levers.py): off unless their environment variable names a known value."""

from __future__ import annotations

import pytest

from minillm.errors import UsageError
from minillm.optim.levers import LEVERS, lever


def test_each_lever_is_off_by_default_and_takes_only_its_values(monkeypatch):
    for name, choices in LEVERS.items():
        monkeypatch.delenv(f"MINILLM_{name}", raising=False)
        assert lever(name) == choices[0]
        monkeypatch.setenv(f"MINILLM_{name}", "")
        assert lever(name) == choices[0]
        for value in choices:
            monkeypatch.setenv(f"MINILLM_{name}", value)
            assert lever(name) == value
        monkeypatch.setenv(f"MINILLM_{name}", "on")
        with pytest.raises(UsageError, match=rf"^MINILLM_{name}=on: not one of {', '.join(choices)}; unset it"):
            lever(name)
