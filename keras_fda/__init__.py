"""keras_fda: communication-efficient distributed training for Keras.

Federated Dynamic Averaging (FDA) lets each worker train locally and averages
the models only when their estimated variance crosses a threshold.

The public names are imported lazily, so that `python -m keras_fda.launch`
starts without loading TensorFlow in the launcher process.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Cluster": "keras_fda.cluster",
    "connect": "keras_fda.cluster",
    "PeerFailureError": "keras_fda.cluster",
    "CommunicationStats": "keras_fda.accounting",
    "FDACallback": "keras_fda.callback",
    "FDAStrategy": "keras_fda.strategy",
    "VarianceEstimator": "keras_fda.estimators",
    "NaiveEstimator": "keras_fda.estimators",
    "LinearEstimator": "keras_fda.estimators",
    "SketchEstimator": "keras_fda.estimators",
    "ExactEstimator": "keras_fda.estimators",
    "SyncTrigger": "keras_fda.triggers",
    "FDA": "keras_fda.triggers",
    "AutoFDA": "keras_fda.triggers",
    "Synchronous": "keras_fda.triggers",
    "Periodic": "keras_fda.triggers",
    "Kamp": "keras_fda.triggers",
    "SyncRule": "keras_fda.outer",
    "Simulation": "keras_fda.simulation",
    "SimulationHistory": "keras_fda.simulation",
    "simulate": "keras_fda.simulation",
    "Dashboard": "keras_fda.tensorboard",
}

# Submodules reachable as attributes, e.g. `keras_fda.partition.iid(...)`.
_SUBMODULES = ("accounting", "estimators", "outer", "partition", "tensorboard", "triggers")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name not in _EXPORTS and name not in _SUBMODULES:
        raise AttributeError(f"module 'keras_fda' has no attribute {name!r}")
    try:
        if name in _SUBMODULES:
            module = importlib.import_module(f"keras_fda.{name}")
            globals()[name] = module
            return module
        module = importlib.import_module(_EXPORTS[name])
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError(
                "keras_fda needs TensorFlow 2.21 and Keras 3.15. Install them with "
                "`pip install keras-fda[cpu]` (or `keras-fda[gpu]` for the CUDA build)."
            ) from e
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
