"""The sync engine: round state, the decision and the sync, shared by every driver.

`core.Engine` owns the reference weights, the trigger's round state and the
counters, parameterised by how a driver all-reduces and assigns;
`averager.WorkerAverager` is the engine of one worker process over a
transport (`exchange.StateExchange` carries its messages at a fixed or
adaptive lag), `mirrored.MirroredEngine` that of a tf.distribute strategy's
replicas, `in_process.InProcessEngine` that of the simulator's K copies; `accounting.CommunicationStats` counts what was sent.
"""
