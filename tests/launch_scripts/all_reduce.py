"""A real two-worker TensorFlow job for tests/test_launch.py: means the worker indices."""

import tensorflow as tf

import keras_fda

cluster = keras_fda.connect(timeout_seconds=60)
value = cluster.transport.all_reduce(tf.constant([float(cluster.worker_index)]), "mean")
print("mean of worker indices:", value.numpy())
