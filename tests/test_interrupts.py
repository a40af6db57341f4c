"""Ctrl-C and SIGTERM never land inside an import: noted there, raised at the next safe point."""

from __future__ import annotations

import signal
import sys

import pytest

from edgepack import interrupts


def _frame_inside_import():
    scope: dict = {}
    exec(compile("import sys\nframe = sys._getframe()", "<frozen importlib._bootstrap>", "exec"), scope)
    return scope["frame"]


@pytest.fixture(autouse=True)
def _no_pending():
    interrupts._pending.clear()
    yield
    interrupts._pending.clear()


def test_a_signal_during_an_import_waits_for_the_next_safe_point():
    interrupts._handler(signal.SIGTERM, _frame_inside_import())   # no exception inside the import
    with pytest.raises(interrupts.Terminated):
        interrupts.check()
    interrupts.check()                                             # raised once, then clear
    interrupts._handler(signal.SIGINT, _frame_inside_import())
    with pytest.raises(KeyboardInterrupt) as caught:
        interrupts.check()
    assert not isinstance(caught.value, interrupts.Terminated)


def test_outside_an_import_the_signal_is_raised_where_the_process_is():
    with pytest.raises(interrupts.Terminated):
        interrupts._handler(signal.SIGTERM, sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        interrupts._handler(signal.SIGINT, sys._getframe())


def test_an_ignored_ctrl_c_stays_ignored():
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupts.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is interrupts._handler
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
