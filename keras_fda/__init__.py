"""keras_fda: communication-efficient distributed training for Keras.

Federated Dynamic Averaging (FDA) lets each worker train locally and averages
the models only when their estimated variance crosses a threshold.
"""

__version__ = "0.1.0"

try:
    import tensorflow  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keras_fda needs TensorFlow 2.21 and Keras 3. Install them with "
        "`pip install keras-fda[cpu]` (or `[gpu]` for the CUDA build)."
    ) from e

from keras_fda.accounting import CommunicationStats
from keras_fda.callback import FDACallback
from keras_fda.cluster import Cluster, connect
from keras_fda.estimators import (
    ExactEstimator,
    LinearEstimator,
    NaiveEstimator,
    SketchEstimator,
    VarianceEstimator,
)
from keras_fda.triggers import FDA, Kamp, Periodic, Synchronous, SyncTrigger

__all__ = [
    "Cluster",
    "CommunicationStats",
    "ExactEstimator",
    "FDA",
    "FDACallback",
    "Kamp",
    "LinearEstimator",
    "NaiveEstimator",
    "Periodic",
    "SketchEstimator",
    "SyncTrigger",
    "Synchronous",
    "VarianceEstimator",
    "connect",
]
