"""What the communication summary tells a user."""

from keras_fda.engine.accounting import CommunicationStats


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


def test_a_sync_payload_other_than_the_model_is_counted_per_sync():
    # bfloat16 drift: 2 bytes per parameter at each sync; the initial broadcast sends the model.
    stats = CommunicationStats(num_workers=2, num_params=100, state_bytes=8, steps=10, syncs=2,
                               sync_bytes=200)  # fmt: skip
    assert stats.bytes_per_sync == 200 and stats.model_bytes == 400
    assert stats.paper_bytes == 2 * 2 * (400 + 2 * 200) + 8 * 10 * 2
    assert stats.synchronous_paper_bytes == 2 * 2 * (400 + 10 * 200)
    assert stats.wire_bytes_per_worker == 2.0 * 1 / 2 * (400 + 2 * 200 + 10 * 8)


def test_the_default_sync_payload_is_the_model():
    plain = CommunicationStats(num_workers=3, num_params=100, state_bytes=8, steps=10, syncs=2)
    same = CommunicationStats(num_workers=3, num_params=100, state_bytes=8, steps=10, syncs=2,
                              sync_bytes=400)  # fmt: skip
    assert plain.bytes_per_sync == 400
    assert plain.paper_bytes == same.paper_bytes == 3 * 2 * 3 * 400 + 8 * 10 * 3
    assert plain.wire_bytes == same.wire_bytes
