"""Packaging for keras_fda."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "keras_fda" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="keras-fda",
    version=VERSION,
    description="Federated Dynamic Averaging: communication-efficient distributed training for Keras",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_fda", "keras_fda.*"]),
    python_requires=">=3.10",
    # TensorFlow itself comes from an extra so that users pick the CPU or CUDA build.
    install_requires=["keras>=3.15,<3.16", "numpy>=1.26", "absl-py>=2.0"],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "test": ["pytest>=8", "scikit-learn>=1.3", "tensorboard>=2.21,<2.22",
                 # The TensorBoard dashboard's browser test (issue 5), with Debian's chromium.
                 "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["keras-fda-launch=keras_fda.launch:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
