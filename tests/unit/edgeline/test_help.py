"""Help as a user reads it, piped or on an 80-column terminal: every option whole, a type only where
an option takes a value, and the rollout gates explained."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from edgeline.cli import app

GATES = ("--stages", "--soak-s", "--max-latency-ratio", "--max-error-rate", "--max-drift", "--shadow-frames")


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [("demo",), ("central", "rollout"), ("central", "serve"), ("edge", "run"),
                                     ("models", "eval-skab"), ("central", "rollouts")])
def test_help_is_whole_at_80_columns_and_flags_show_no_type(command: tuple[str, ...]) -> None:
    text = help_text(*command)
    assert "<bool>" not in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_boolean_flags_read_as_flags() -> None:
    text = help_text("demo")
    assert "--live / --no-live" in text and "--embedded-broker / --no-embedded-broker" in text


def test_every_rollout_gate_has_help() -> None:
    text = help_text("central", "rollout")
    for gate in GATES:
        described = re.search(rf"^  {gate} (?:<\w+>|[A-Z]+) +(\S.*)$", text, re.MULTILINE)  # typer's metavars: <float> or FLOAT
        assert described and not described.group(1).startswith("[default"), gate
    assert "$EDGELINE_CENTRAL_TOKEN_FILE" in text and "$EDGELINE_CENTRAL_TOKEN" in text


def test_serve_documents_both_token_variables() -> None:
    text = " ".join(help_text("central", "serve").split())
    assert "$EDGELINE_CENTRAL_TOKEN_FILE" in text and "read from $EDGELINE_CENTRAL_TOKEN" in text
