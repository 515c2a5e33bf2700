"""The distributed runtime: the cluster, the transport and the launcher.

`cluster` connects a worker to TensorFlow's collective runtime (TF_CONFIG,
gRPC) and watches for dead peers, `transport` all-reduces tensors over it and
knows nothing of FDA, `launch` starts one process per worker on a machine.
Importing this package (or `launch`) loads no TensorFlow.
"""
