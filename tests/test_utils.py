"""Unset command-line option values (``common.utils``)."""

import pytest

from common.utils import is_unset, optional


@pytest.mark.parametrize("value, unset", [(None, True), ("", True), ("None", True), (0, False), ("0", False),
                                          ("none", False), (False, False), ([], False)])
def test_is_unset(value, unset):
    assert is_unset(value) is unset


def test_optional_casts_only_set_values():
    assert optional("None", int) is None and optional(None, float) is None
    assert optional("4", int) == 4 and optional(2.5, float) == 2.5


@pytest.mark.parametrize("value, expected", [("false", False), ("False", False), ("0", False), ("true", True),
                                             ("1", True), (True, True), (False, False), (0, False)])
def test_as_flag_reads_command_line_booleans(value, expected):
    from common.utils import as_flag

    assert as_flag(value) is expected
