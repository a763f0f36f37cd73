"""Shared fixtures."""

import jaxtyping
import pytest


@pytest.fixture
def no_typecheck():
    """Turn jaxtyping's runtime checks off, to see the errors users get (they run unchecked)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)
