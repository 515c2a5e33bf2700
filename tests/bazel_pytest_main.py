"""Runs one pytest module as a Bazel py_test: `bazel_pytest_main.py tests/test_x.py [pytest args]`.

tests/BUILD passes the module's runfiles path. This keeps the test modules plain pytest files
(fixtures, parametrize, `from conftest import ...`) and maps Bazel's test protocol onto pytest:
the JUnit XML report goes to $XML_OUTPUT_FILE and `bazel test --test_filter=EXPR` becomes `-k EXPR`.
"""

import os
import sys

import pytest


def main(argv):
    if len(argv) < 1:
        sys.exit("usage: bazel_pytest_main.py TEST_MODULE.py [pytest args...]")
    # Runfiles are read-only symlinks: keep .pyc files and pytest's cache out of them.
    sys.dont_write_bytecode = True
    args = [argv[0], "-q", "-p", "no:cacheprovider", *argv[1:]]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    import keras_fda

    print(f"keras_fda {keras_fda.__version__} from {os.path.dirname(keras_fda.__file__)}", flush=True)
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
