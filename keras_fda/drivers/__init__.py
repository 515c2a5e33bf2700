"""Drivers: how users run FDA, each a thin composition of the engine and a transport.

`callback.FDACallback` (one Keras `fit` per worker process),
`strategy.FDAStrategy` (a `tf.distribute` strategy), `simulation.Simulation`
(K workers in one process, recording a `history.SimulationHistory`), and
`tensorboard.Dashboard`, the charts they all write; `hooks` and
`model_checks` are how they meet the user's Keras model.
"""
