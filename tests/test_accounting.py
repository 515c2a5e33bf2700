"""What the communication summary tells a user."""

from keras_fda.accounting import CommunicationStats


def test_one_worker_says_nothing_was_sent():
    stats = CommunicationStats(num_workers=1, num_params=100, state_bytes=8, steps=10, syncs=2)
    summary = stats.summary()
    assert "nothing was sent" in summary
    assert "times more" not in summary and "MB" not in summary
    assert stats.wire_bytes == 0


def test_several_workers_compare_with_synchronous():
    stats = CommunicationStats(num_workers=2, num_params=100, state_bytes=8, steps=10, syncs=2)
    # paper bytes: 3 * 2 * 2 * 400 + 8 * 10 * 2 = 4960; synchronous: 11 * 2 * 2 * 400 = 17600
    assert stats.paper_bytes == 4960 and stats.synchronous_paper_bytes == 17600
    assert "FDA sent 0.00 MB" in stats.summary() and "(3.5 times more)" in stats.summary()


def test_float64_syncs_count_eight_bytes_per_parameter():
    stats = CommunicationStats(num_workers=2, num_params=100, state_bytes=8, steps=10, syncs=2,
                               param_bytes=8)  # fmt: skip
    assert stats.model_bytes == 800
    assert stats.paper_bytes == 3 * 2 * 2 * 800 + 8 * 10 * 2
