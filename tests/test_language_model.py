"""examples/language_model.py: the byte-level GPT on the standard library's source, under FDA."""

import importlib.util
import math
import os
import re

from conftest import REPO, check_flags, launch

EXAMPLE = os.path.join(REPO, "examples", "language_model.py")

# A tiny model and a few steps: the test checks the plumbing (split, training,
# the final average, the report), not what the model learns.
TINY = [
    "--steps=12", "--seq_len=32", "--dim=32", "--layers=1", "--heads=2", "--batch_size=8",
    "--bytes_per_worker=20000", "--val_bytes=4096", "--log_every=4",
]


def load_example():
    spec = importlib.util.spec_from_file_location("language_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_workers_train_disjoint_modules_into_one_averaged_model():
    result = launch(2, "examples/language_model.py", *TINY, "--trigger=periodic", "--tau=4",
                    timeout=150)  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    shares = dict(re.findall(
        r"\[worker \d\] worker (\d): \d+ training bytes from \d+ modules \((.*), \.\.\.\)", out
    ))
    assert sorted(shares) == ["0", "1"], out[-4000:]
    assert not set(shares["0"].split(", ")) & set(shares["1"].split(", "))
    reports = re.findall(
        r"\[worker (\d)\] worker \d: validation loss ([\d.]+), perplexity ([\d.]+|inf), "
        r"bits per byte ([\d.]+)",
        out,
    )
    assert sorted(r[0] for r in reports) == ["0", "1"], out[-4000:]
    # fit ends with a sync: both workers evaluate the same weights.
    assert reports[0][1:] == reports[1][1:]
    loss, ppl = float(reports[0][1]), float(reports[0][2])
    # Below a uniform guess over 256 bytes (ln 256 = 5.55): it trained.
    assert loss < math.log(256)
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-3)
    # tau = 4 in 12 steps: syncs after steps 4, 8 and 12, none left for the end.
    assert re.search(r"\[worker 0\] syncs: 3 in 12 steps", out), out[-4000:]
    assert re.search(r"\[worker 0\] tokens/s: [\d,]+ per worker", out), out[-4000:]
    assert re.search(r"\[worker 0\] FDA sent [\d.]+ MB; synchronous averaging", out)
    assert "[worker 1] syncs:" not in out


def test_module_split_is_disjoint_deterministic_and_capped():
    lm = load_example()
    modules = lm.stdlib_modules()
    assert "json" in modules and "test" not in modules
    shares, held_out = lm.split_modules(sorted(modules), 4, seed=0)
    again, _ = lm.split_modules(sorted(reversed(sorted(modules))), 4, seed=0)
    assert shares == again
    everything = [n for share in shares for n in share] + held_out
    assert sorted(everything) == sorted(modules)  # each module exactly once
    assert len(held_out) == math.ceil(len(modules) / lm.HOLDOUT_EVERY)
    (x, y), names = lm.load_worker_data(2, 4, seq_len=16, max_bytes=5000, modules=modules)
    assert names == shares[2][: len(names)]
    assert x.shape[1] == 16 and x.size <= 5000 and (x[:, 1:] == y[:, :-1]).all()


# Runs the example's flag handling through absl's app.run, as the command line
# does, for several argument lists in one process (one TensorFlow import):
# "bad" ones through main, which must stop before TensorFlow starts, "good"
# ones through the callback_args it calls first.
FLAG_CHECKS = """
import json, runpy, sys
from absl import app, flags

cases = json.load(sys.stdin)
lm = runpy.run_path(sys.argv[1], run_name="language_model")
lm["define_flags"]()
for kind, args in cases:
    flags.FLAGS.unparse_flags()
    main = lm["main"] if kind == "bad" else (
        lambda argv: print("ARGS", json.dumps(lm["callback_args"](flags.FLAGS)), flush=True))
    print("=== case", file=sys.stderr, flush=True)
    try:
        app.run(main, argv=["language_model.py", *args])
    except SystemExit as e:
        print("=== exit", e.code, file=sys.stderr, flush=True)
"""

BAD_FLAGS = [
    (["--trigger=sometimes"], "use auto, periodic, synchronous or a positive number"),
    (["--trigger=-1"], "use auto, periodic, synchronous or a positive number"),
    (["--trigger=auto", "--tau=8"], "--tau is used only by --trigger=periodic"),
    (["--trigger=synchronous", "--outer=nesterov"], "an outer Nesterov step there"),
    (["--dim=30", "--heads=4"], "--heads=4 must divide --dim=30"),
    (["--steps=10", "--warmup_steps=10"], "leaves no step of the cosine decay"),
    (["--outer=sideways"], "--outer"),
]
GOOD_FLAGS = [
    ([], {"outer_optimizer": "nesterov", "threshold": "auto"}),
    (["--trigger=periodic", "--tau=32"],
     {"outer_optimizer": "nesterov", "trigger": "periodic", "tau": 32}),
    (["--trigger=synchronous"], {"outer_optimizer": None, "trigger": "synchronous"}),
    (["--trigger=2.5", "--outer=none"], {"outer_optimizer": None, "threshold": 2.5}),
]  # fmt: skip


def test_bad_flag_combinations_are_usage_errors():
    stdout = check_flags(FLAG_CHECKS, BAD_FLAGS, GOOD_FLAGS, EXAMPLE)
    # Every bad case stopped before reading data: none said what it trained on.
    assert "training bytes from" not in stdout
