"""Simulator efficiency alone: K x one plain step / one simulator step, interleaved.

The measurement `comm_to_accuracy.py` makes before each configuration, without
the sweeps, so it can be repeated with more rounds on a quiet machine:

    python benchmarks/simulator_efficiency.py --models=cnn --tasks=femnist62 --workers=10 --efficiency_rounds=3

It takes comm_to_accuracy.py's flags (the first value of each list).

Plain `model.fit` steps and 50-step simulator runs (synchronous averaging,
and linear FDA with a threshold it never reaches: the check alone) alternate
in each round; medians over the rounds. Goal: efficiency >= 0.77 (a simulator
step <= 1.3 x K plain steps).
"""

import os
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comm_to_accuracy as bench  # noqa: E402
import models  # noqa: E402

FLAGS = bench.FLAGS


def main(argv):
    del argv
    import numpy as np

    from keras_fda.drivers.simulation import Simulation

    model_name = (FLAGS.models or ["cnn"])[0]
    task = (FLAGS.tasks or ["femnist62"])[0]
    workers = int((FLAGS.workers or [10])[0])
    rounds = FLAGS.efficiency_rounds or 3
    data = dict(np.load(bench.ROOT / FLAGS.data_path))
    x, y, writers, _, _, classes = bench.load_task(data, task, 400)
    sim = Simulation(models.build(model_name, classes, FLAGS.seed), workers)
    parts = bench.make_partitions(FLAGS.partition, writers, y, workers, FLAGS.seed)
    plain, measured = bench.measure_efficiency(
        sim, model_name, classes, x, y, parts, FLAGS.seed, rounds
    )
    print(f"{model_name}, {task}, K = {workers}, {rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"plain step {plain:.2f} ms")
    for family, ms in measured.items():
        print(f"{family}: simulator step {ms:.1f} ms, efficiency {workers * plain / ms:.2f}")


if __name__ == "__main__":
    app.run(main)
