"""The collective watchdog (`CollectiveTransport.deadline()`): it aborts a block that
overruns its deadline, and never the block after one that ended in time.

The watchdog's thread, clock and abort are replaced by stand-ins that the test
steps through, so that the interleaving of the two threads is exact, not timed.
"""

import threading
import types

import pytest

from keras_fda.runtime import transport

WAIT = 30  # seconds any step of the stand-ins may take before the test fails


class SteppedTime:
    """`time` for the watchdog: its sleeps end, and its clock reads return, when the test says."""

    def __init__(self):
        self.now = 0.0
        self._tick = threading.Event()  # lets the watchdog's current sleep end
        self.asleep = threading.Event()  # the watchdog finished a poll and sleeps again
        self.hold_clock = None  # (reached, resume): the watchdog's next clock read waits
        self.stopped = False

    def monotonic(self):
        if threading.current_thread().name == "keras_fda-watchdog" and self.hold_clock:
            reached, resume = self.hold_clock
            self.hold_clock = None
            reached.set()
            assert resume.wait(WAIT)
        return self.now

    def sleep(self, seconds):
        self.asleep.set()
        if not self._tick.wait(WAIT) or self.stopped:
            threading.Event().wait()  # parks the watchdog's daemon thread for good
        self._tick.clear()

    def poll(self):
        """Lets the watchdog make one poll (returns at once; see `asleep`)."""
        self.asleep.clear()
        self._tick.set()

    def stop(self):
        self.stopped = True
        self._tick.set()


@pytest.fixture
def watchdog(monkeypatch):
    clock = SteppedTime()
    aborts = []
    fake_context = types.SimpleNamespace(
        abort_collective_ops=lambda code, message: aborts.append(message)
    )
    monkeypatch.setattr(transport, "time", clock)
    monkeypatch.setattr(transport, "context", types.SimpleNamespace(context=lambda: fake_context))
    dog = transport._Watchdog(10.0)
    yield dog, clock, aborts
    clock.stop()


def overrun(dog, clock):
    """Enters a block and lets the watchdog poll once past its deadline; returns the block."""
    block = dog.guard()
    block.__enter__()
    assert clock.asleep.wait(WAIT)
    clock.now = 10.5
    clock.poll()
    assert clock.asleep.wait(WAIT)
    return block


def test_a_block_that_overruns_its_deadline_is_aborted(watchdog):
    dog, clock, aborts = watchdog
    block = overrun(dog, clock)
    assert len(aborts) == 1 and "no answer from the other workers within 10 s" in aborts[0]
    with pytest.raises(transport.errors.DeadlineExceededError):
        block.__exit__(None, None, None)


def test_the_block_after_one_that_ended_just_in_time_is_not_aborted(watchdog):
    """The watchdog looks at block 1's deadline; block 1 ends 0.01 s before it and
    block 2 begins; then the watchdog's clock reads past block 1's deadline."""
    dog, clock, aborts = watchdog
    first = dog.guard()
    first.__enter__()
    assert clock.asleep.wait(WAIT)
    clock.now = 9.99
    reached, resume = threading.Event(), threading.Event()
    clock.hold_clock = (reached, resume)
    clock.poll()
    assert reached.wait(WAIT)  # the watchdog has read block 1's deadline, not yet the clock
    first.__exit__(None, None, None)
    second = dog.guard()
    second.__enter__()
    clock.now = 10.01
    resume.set()
    assert clock.asleep.wait(WAIT)  # that poll is over
    assert aborts == []
    second.__exit__(None, None, None)


def test_a_block_that_ends_while_it_is_aborted_fails_at_its_end(watchdog):
    """The abort is made; the block it was meant for ends normally right after: the
    collectives stay aborted, so that block must fail rather than the next one."""
    dog, clock, aborts = watchdog
    block = overrun(dog, clock)
    assert len(aborts) == 1
    with pytest.raises(transport.errors.DeadlineExceededError, match="within 10 s"):
        block.__exit__(None, None, None)
    # The next block starts clean.
    second = dog.guard()
    second.__enter__()
    second.__exit__(None, None, None)
