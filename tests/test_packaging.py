"""The wheel and sdist a user gets: the package and its metadata, no tests, no data.

Builds from a copy of the working tree (so build/ and *.egg-info never land in the checkout),
with the setuptools and wheel already installed (the `test` extra), no network needed.
"""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (REPO / "keras_fda" / "__init__.py").read_text(), re.M
).group(1)
MODULES = sorted(p.relative_to(REPO / "keras_fda").as_posix() for p in (REPO / "keras_fda").rglob("*.py"))
DATA_SUFFIXES = (".npz", ".npy", ".h5", ".keras", ".csv", ".png", ".json", ".pyc", ".so")
_IGNORE_NAMES = shutil.ignore_patterns(
    ".git", "bazel-*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "logs", "tmp"
)


def IGNORE(directory, names):
    """Build outputs, caches and any virtualenv a user made inside the checkout (.venv ...)."""
    ignored = set(_IGNORE_NAMES(directory, names))
    return ignored | {n for n in names if os.path.isfile(os.path.join(directory, n, "pyvenv.cfg"))}


def run(*command, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def build_isolation_flags():
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:  # build in an isolated env from the package index instead
        return []
    return ["--no-build-isolation"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tree = tmp_path_factory.mktemp("src") / "keras_fda_src"
    shutil.copytree(REPO, tree, ignore=IGNORE, symlinks=True)
    return tree


@pytest.fixture(scope="module")
def wheel_path(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
        *build_isolation_flags(), "-w", out, source)
    wheels = list(out.glob("*.whl"))
    assert [w.name for w in wheels] == [f"keras_fda-{VERSION}-py3-none-any.whl"]
    return wheels[0]


def test_wheel_holds_the_package_and_nothing_else(wheel_path):
    names = zipfile.ZipFile(wheel_path).namelist()
    dist_info = f"keras_fda-{VERSION}.dist-info/"
    assert sorted(n for n in names if n.startswith("keras_fda/")) == [
        f"keras_fda/{m}" for m in MODULES
    ]
    assert not [n for n in names if not n.startswith(("keras_fda/", dist_info))]
    assert not [n for n in names if n.endswith(DATA_SUFFIXES)]
    assert not [n for n in names if re.search(r"(^|/)(tests?|examples|benchmarks|third_party)/", n)]
    assert not [n for n in names if n.split("/")[-1] in ("BUILD", "WORKSPACE", "conftest.py")]


def test_wheel_metadata(wheel_path):
    wheel = zipfile.ZipFile(wheel_path)
    metadata = email.parser.Parser().parsestr(
        wheel.read(f"keras_fda-{VERSION}.dist-info/METADATA").decode()
    )
    assert metadata["Name"] == "keras-fda"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == ">=3.11"
    requires = [r.replace(" ", "") for r in metadata.get_all("Requires-Dist")]
    assert "keras<3.16,>=3.15" in requires
    # The dashboard is part of the callback: tensorboard is a dependency, not a test extra.
    assert "tensorboard<2.22,>=2.21" in requires
    assert {"cpu", "gpu", "examples", "test"} <= set(metadata.get_all("Provides-Extra"))
    assert 'tensorflow-cpu<2.22,>=2.21;extra=="cpu"' in requires
    assert 'tensorflow[and-cuda]<2.22,>=2.21;extra=="gpu"' in requires
    assert not [r for r in requires if r.startswith("tensorflow") and "extra" not in r]
    entry_points = wheel.read(f"keras_fda-{VERSION}.dist-info/entry_points.txt").decode()
    assert "keras-fda-launch = keras_fda.launch:main" in entry_points


def dependency_paths():
    """The directories this interpreter imports installed packages from.

    Whatever the suite runs in (a venv, the system Python, conda), these hold
    TensorFlow, Keras and the rest. `venv.create(system_site_packages=True)`
    would see the base interpreter's instead, which lacks them in a venv.
    """
    return [
        p for p in sys.path
        if os.path.isdir(p) and pathlib.Path(p).name in ("site-packages", "dist-packages")
    ]


def test_wheel_installs_into_a_fresh_venv_and_imports(wheel_path, tmp_path):
    # Installing TensorFlow again would take minutes: the venv sees this interpreter's
    # packages through a .pth file. Directories listed there are not scanned for .pth files
    # themselves, so an editable install of the checkout stays invisible: keras_fda must
    # come from the wheel.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    (site_packages,) = env_dir.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text("\n".join(dependency_paths()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--disable-pip-version-check", wheel_path)
    result = run(
        python, "-c",
        "import keras_fda; print(keras_fda.__version__); print(keras_fda.__file__); "
        "print(keras_fda.FDACallback.__module__)",
        cwd=tmp_path,
    )
    version, location, callback_module = result.stdout.split()
    assert version == VERSION
    assert pathlib.Path(location).is_relative_to(env_dir)
    assert callback_module == "keras_fda.drivers.callback"
    assert (env_dir / "bin" / "keras-fda-launch").exists()


def test_sdist_has_sources_and_no_data(source, tmp_path):
    run(sys.executable, "setup.py", "-q", "sdist", "-d", tmp_path, cwd=source)
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
    assert {f"keras_fda/{m}" for m in MODULES} <= set(names)
    assert {"setup.py", "README.md", "CHANGELOG.md", "MANIFEST.in", "tests/conftest.py",
            "examples/quickstart.py", "benchmarks/comm_to_accuracy.py"} <= set(names)
    assert not [n for n in names if n.endswith(DATA_SUFFIXES)]
    assert not [n for n in names if n.startswith(("benchmarks/results/", "third_party/", "bazel-"))]
    assert not [n for n in names if n.split("/")[-1] in ("BUILD", "WORKSPACE", ".bazelrc")]
