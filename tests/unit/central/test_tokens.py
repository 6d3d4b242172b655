"""The API token is found the same way by `central serve` and the clients: a file first, then the
value in $EDGELINE_CENTRAL_TOKEN."""

from __future__ import annotations

import pytest

from central.tokens import find_read_token, find_token

VALUE = "token-from-the-environment"


def test_a_file_wins_over_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("token-from-the-file-0001\n")
    assert find_token(path, {"EDGELINE_CENTRAL_TOKEN": VALUE}) == "token-from-the-file-0001"
    assert find_token(None, {"EDGELINE_CENTRAL_TOKEN": f"  {VALUE}\n"}) == VALUE
    assert find_token(None, {}) is None


def test_unreadable_file_and_short_token_are_refused_with_where_they_came_from(tmp_path):
    with pytest.raises(ValueError, match=r"nope: cannot read the API token"):
        find_token(tmp_path / "nope", {})
    with pytest.raises(ValueError, match=r"^\$EDGELINE_CENTRAL_TOKEN: the API token must be at least 16"):
        find_token(None, {"EDGELINE_CENTRAL_TOKEN": "short"})


def test_a_client_reads_with_the_read_token_else_the_write_token(tmp_path):
    write = tmp_path / "token"
    write.write_text("the-write-token-0001\n")
    read = {"EDGELINE_CENTRAL_READ_TOKEN": "the-read-token-00001"}
    assert find_read_token(None, write, read) == "the-read-token-00001"
    assert find_read_token(None, write, {}) == "the-write-token-0001"
    assert find_read_token(None, None, {"EDGELINE_CENTRAL_TOKEN": VALUE}) == VALUE
    assert find_read_token(None, None, {}) is None
