"""Optional packages: mark the tests that need one, so the others still run without it."""

import pytest


def importable(*names: str) -> bool:
    """Whether every module in ``names`` imports."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            return False
    return True


def needs(*names: str, extra: str) -> pytest.MarkDecorator:
    """A skip mark for a test that needs the modules ``names`` (installed with ``extra``)."""
    return pytest.mark.skipif(not importable(*names), reason=f"needs {', '.join(names)}: {extra}")
