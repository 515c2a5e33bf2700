"""Times all-reduces over the emulated network; each worker prints one JSON line.

Run inside the harness:

    python benchmarks/network.py --workers 2 --rate_mbit 20 \
        benchmarks/network_allreduce.py --megabytes=4

Each worker all-reduces (sum) a float32 tensor of `--megabytes` `--repeats`
times (`--op=gather`: all-gathers an int32 tensor of as many bytes, as a
quantized sync does) and a 2-float tensor `--small_repeats` times, and prints
`NETWORK_ALLREDUCE {json}` with the elapsed seconds of each, the bytes its
link (eth0 in its namespace) sent and received meanwhile, and whether every
sum was right (the relay must forward the bytes unchanged).
"""

import keras_fda

cluster = keras_fda.connect(timeout_seconds=300)

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_float("megabytes", 4.0, "Size of the large all-reduce, MB (10^6 bytes).")
flags.DEFINE_integer("repeats", 2, "Timed large all-reduces.")
flags.DEFINE_integer("small_repeats", 10, "Timed small (2-float) all-reduces.")
flags.DEFINE_enum("op", "sum", ["sum", "gather"], "The large collective: all-reduce or all-gather.")
FLAGS = flags.FLAGS


def link_bytes():
    """(tx, rx) bytes of this namespace's eth0 (0, 0 outside the harness)."""
    try:
        return tuple(
            int(open(f"/sys/class/net/eth0/statistics/{d}_bytes").read()) for d in ("tx", "rx")
        )
    except OSError:
        return 0, 0


def main(argv):
    del argv
    transport = cluster.transport
    k, index = cluster.num_workers, cluster.worker_index
    n = int(FLAGS.megabytes * 1e6 / 4)
    # Worker i contributes i + 1 everywhere: every sum is k (k + 1) / 2.
    small = tf.fill([2], float(index + 1))
    reduce_fn = tf.function(lambda t: transport.all_reduce(t, "sum"))
    if FLAGS.op == "sum":
        large, large_fn = tf.fill([n], float(index + 1)), reduce_fn
        expected = k * (k + 1) / 2
    else:
        large = tf.fill([n], index + 1)
        large_fn = tf.function(lambda t: tf.reshape(transport.all_gather(t), [k, -1]))
        expected = np.arange(1, k + 1)[:, None]  # row i holds worker i's tensor
    correct = True

    def barrier():
        # Returns only once the other workers finished what came before, so
        # every byte this worker sent for it has left the rate limiter's
        # queue and is in eth0's counters (a worker that has received
        # everything may finish while its own last bytes still wait there).
        reduce_fn(small).numpy()

    def timed(fn, tensor, repeats, expected):
        nonlocal correct
        fn(tensor).numpy()  # tracing, connection setup; also lines the workers up
        barrier()
        before, start = link_bytes(), time.perf_counter()
        for _ in range(repeats):
            out = fn(tensor).numpy()
            correct = correct and bool(np.all(out == expected))
        elapsed = time.perf_counter() - start
        barrier()
        after = link_bytes()
        return elapsed / repeats, [(a - b) / repeats for a, b in zip(after, before)]

    small_s, _ = timed(reduce_fn, small, FLAGS.small_repeats, k * (k + 1) / 2)
    large_s, (tx, rx) = timed(large_fn, large, FLAGS.repeats, expected)
    print("NETWORK_ALLREDUCE " + json.dumps({
        "worker": index,
        "op": FLAGS.op,
        "payload_bytes": 4 * n,
        "large_seconds": large_s,
        "large_tx_bytes": tx,
        "large_rx_bytes": rx,
        "small_seconds": small_s,
        "correct": correct,
    }), flush=True)


if __name__ == "__main__":
    app.run(main)
