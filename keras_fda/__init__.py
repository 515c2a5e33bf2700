"""keras_fda: communication-efficient distributed training for Keras.

Federated Dynamic Averaging (FDA) lets each worker train locally and averages
the models only when their estimated variance crosses a threshold.

The public names are imported lazily, so that `python -m keras_fda.launch`
starts without loading TensorFlow in the launcher process.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Cluster": "keras_fda.runtime.cluster",
    "connect": "keras_fda.runtime.cluster",
    "PeerFailureError": "keras_fda.runtime.cluster",
    "CommunicationStats": "keras_fda.engine.accounting",
    "FDACallback": "keras_fda.drivers.callback",
    "FDAStrategy": "keras_fda.drivers.strategy",
    "VarianceEstimator": "keras_fda.policies.estimators",
    "NaiveEstimator": "keras_fda.policies.estimators",
    "LinearEstimator": "keras_fda.policies.estimators",
    "SketchEstimator": "keras_fda.policies.estimators",
    "ExactEstimator": "keras_fda.policies.estimators",
    "SyncTrigger": "keras_fda.policies.triggers",
    "FDA": "keras_fda.policies.triggers",
    "AutoFDA": "keras_fda.policies.triggers",
    "Synchronous": "keras_fda.policies.triggers",
    "Periodic": "keras_fda.policies.triggers",
    "Kamp": "keras_fda.policies.triggers",
    "QSR": "keras_fda.policies.triggers",
    "PostLocal": "keras_fda.policies.triggers",
    "SyncRule": "keras_fda.policies.outer",
    "Simulation": "keras_fda.drivers.simulation",
    "SimulationHistory": "keras_fda.drivers.history",
    "simulate": "keras_fda.drivers.simulation",
    "Dashboard": "keras_fda.drivers.tensorboard",
}

# Submodules reachable as attributes, e.g. `keras_fda.partition.iid(...)`.
_SUBMODULES = {
    "accounting": "keras_fda.engine.accounting",
    "estimators": "keras_fda.policies.estimators",
    "outer": "keras_fda.policies.outer",
    "partition": "keras_fda.partition",
    "tensorboard": "keras_fda.drivers.tensorboard",
    "triggers": "keras_fda.policies.triggers",
}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name not in _EXPORTS and name not in _SUBMODULES:
        raise AttributeError(f"module 'keras_fda' has no attribute {name!r}")
    try:
        if name in _SUBMODULES:
            module = importlib.import_module(_SUBMODULES[name])
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
