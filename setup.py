"""Packaging for keras_fda.

Supported versions (keep in step with README.md and CHANGELOG.md):
  Python 3.11+ (Keras 3.15 requires it), TensorFlow 2.21, Keras 3.15 (TensorFlow backend),
  Linux and macOS.

Build a wheel with `pip wheel --no-deps -w dist .` (or `python setup.py sdist bdist_wheel`); it
holds only the keras_fda package: tests, examples, benchmarks and their data stay out
(tests/test_packaging.py checks this).
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "keras_fda" / "__init__.py").read_text(), re.M
).group(1)

# The one TensorFlow / Keras minor release this version is tested against.
KERAS = "keras>=3.15,<3.16"
TENSORFLOW = ">=2.21,<2.22"

setup(
    name="keras-fda",
    version=VERSION,
    description="Federated Dynamic Averaging: communication-efficient distributed training for Keras",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_fda", "keras_fda.*"]),
    # Only the modules: no data files, whatever MANIFEST.in puts in the sdist.
    include_package_data=False,
    zip_safe=False,
    python_requires=">=3.11",  # Keras 3.15 requires Python >= 3.11
    # TensorFlow itself comes from an extra so that users pick the CPU or CUDA build.
    # tensorboard: the dashboard module is part of the callback. tensorflow-cpu 2.21 no longer
    # depends on it, so a user's `pip install keras-fda[cpu]` would otherwise crash at import.
    install_requires=[KERAS, "numpy>=1.26", "absl-py>=2.0", "tensorboard" + TENSORFLOW],
    extras_require={
        "cpu": ["tensorflow-cpu" + TENSORFLOW],
        "gpu": ["tensorflow[and-cuda]" + TENSORFLOW],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "benchmarks": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        # setuptools and wheel: tests/test_packaging.py builds the wheel without build isolation.
        "test": ["pytest>=8", "scikit-learn>=1.3",
                 "setuptools>=61", "wheel>=0.37",
                 # The benchmark smoke test (tests/test_simulation.py) draws its plot.
                 "matplotlib>=3.7",
                 # The TensorBoard dashboard's browser test (issue 5), with Debian's chromium.
                 "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["keras-fda-launch=keras_fda.launch:main"]},
    keywords="keras tensorflow distributed-training federated-learning communication-efficient",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
