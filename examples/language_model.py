"""A byte-level GPT-style language model trained with FDA, as DiLoCo users train.

Trains a small decoder-only transformer (token + position embeddings, pre-norm
causal self-attention blocks, byte vocabulary of 256: no tokenizer, no
download) on the Python standard library's own source code, which every Python
installation has. The corpus is split across the workers by top-level module
or package (a natural non-IID split, like whole writers: one worker may get
`asyncio` and `email`, another `encodings` and `tkinter`); every tenth module
is held out for validation. Inside each worker: AdamW with linear warmup and
cosine decay (as DiLoCo's inner optimizer); between workers: FDACallback, by
default `threshold="auto"` with DiLoCo's outer Nesterov step.

    python -m keras_fda.launch --workers 2 examples/language_model.py

The default (about 0.5M parameters, 800 steps of 16 x 128 bytes per worker)
finishes in a few minutes on 2 CPU cores. It prints the validation loss of the
averaged model, its perplexity (per byte) and bits per byte, the training
throughput in tokens (bytes) per second and the communication summary.

Other triggers: `--trigger=periodic --tau=64` (DiLoCo with H = 64),
`--trigger=synchronous` (average every step), `--trigger=2.5` (FDA with a
fixed threshold); `--outer=none` adopts the plain average at a sync.

On a GPU, pick a larger model and more data, e.g. `--dim=512 --layers=8
--heads=8 --seq_len=256 --batch_size=64 --steps=5000 --bytes_per_worker=8000000`
(about 25M parameters); with the per-step exchange hidden behind the next
step, the bytes FDA sends stay a few per step between syncs.

The data and model functions (`load_worker_data`, `load_validation_data`,
`make_model`, `compile_model`) are importable: benchmarks/language_model.py runs
the same workload in `keras_fda.Simulation`. Importing this module defines no
flags and starts nothing.
"""

import math
import os
import sysconfig
import time

import keras
import numpy as np

# Packages left out of the corpus. `test` is CPython's regression suite, half
# of the library's bytes; Debian and others ship it separately, so leaving it
# out keeps the corpus (and every figure) the same across installations.
EXCLUDED = frozenset({"test", "site-packages", "__pycache__", "lib-dynload", "idlelib"})

# Every HOLDOUT_EVERY-th module (in the seeded order) is validation only.
HOLDOUT_EVERY = 10

# A module contributes at most this fraction of a worker's bytes, so that one
# large package (encodings' charmap tables, pydoc_data's topics) does not make
# up a whole share: a worker sees several modules, each its own style.
MODULE_FRACTION = 1 / 8


def stdlib_modules(root=None):
    """The standard library's top-level modules and packages with their source files.

    Args:
        root: the library folder; default `sysconfig.get_paths()["stdlib"]`.

    Returns:
        `{name: [path, ...]}`, names sorted, each package's `.py` files sorted
        (a module is one file).
    """
    root = root or sysconfig.get_paths()["stdlib"]
    modules = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in EXCLUDED or name.startswith("config-"):
            continue
        if os.path.isfile(path) and name.endswith(".py"):
            modules[name[:-3]] = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            files = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(s for s in subfolders if s != "__pycache__")
                files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
            modules[name] = files
    return modules


def split_modules(names, num_workers, seed=0):
    """Deals module names to workers, deterministically and disjointly.

    The names are shuffled with `seed`; every `HOLDOUT_EVERY`-th is held out
    for validation and the rest are dealt round robin, so each worker gets its
    own set of whole modules (the same on every worker and every run).

    Returns:
        `(shares, held_out)`: K lists of names and the validation names.
    """
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    held_out = order[::HOLDOUT_EVERY]
    rest = [n for i, n in enumerate(order) if i % HOLDOUT_EVERY]
    return [rest[k::num_workers] for k in range(num_workers)], held_out


def read_modules(modules, names, max_bytes):
    """The bytes of `names`' source files, in order, at most `max_bytes` of them.

    Each module gives at most `MODULE_FRACTION * max_bytes` (its files in
    order, cut there); files are read only while bytes are still wanted, so a
    capped share reads fast whatever the library's size.

    Returns:
        `(tokens, read)`: a uint8 array and the names of the modules it holds.
    """
    per_module = max(1, int(max_bytes * MODULE_FRACTION))
    chunks, read, total = [], [], 0
    for name in names:
        if total >= max_bytes:
            break
        taken = 0
        for path in modules[name]:
            want = min(per_module - taken, max_bytes - total)
            if want <= 0:
                break
            with open(path, "rb") as f:
                data = f.read(want)
            chunks.append(data)
            taken += len(data)
            total += len(data)
        read.append(name)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), read


def windows(tokens, seq_len):
    """Cuts a byte array into non-overlapping next-byte examples.

    Returns:
        `(x, y)`, int32 arrays of shape `[n, seq_len]`, `y` being `x` shifted
        by one byte.
    """
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} bytes make no window of {seq_len + 1}.")
    tokens = np.asarray(tokens[: n * seq_len + 1], dtype=np.int32)
    return tokens[:-1].reshape(n, seq_len), tokens[1:].reshape(n, seq_len)


def load_worker_data(index, num_workers, *, seq_len, max_bytes, seed=0, modules=None):
    """Worker `index`'s training examples `(x, y)` and the names of the modules they come from.

    `modules` (from `stdlib_modules`) defaults to this installation's library.
    """
    modules = modules if modules is not None else stdlib_modules()
    shares, _ = split_modules(sorted(modules), num_workers, seed)
    tokens, read = read_modules(modules, shares[index], max_bytes)
    return windows(tokens, seq_len), read


def load_validation_data(*, seq_len, max_bytes, seed=0, modules=None):
    """The held-out modules' examples `(x, y)` and their names (independent of K)."""
    modules = modules if modules is not None else stdlib_modules()
    _, held_out = split_modules(sorted(modules), 1, seed)
    tokens, read = read_modules(modules, held_out, max_bytes)
    return windows(tokens, seq_len), read


@keras.saving.register_keras_serializable(package="keras_fda_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to its input `[batch, length, dim]`."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embedding",
        )

    def call(self, x):
        return x + self.embedding[: keras.ops.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def make_model(*, seq_len, dim, layers, heads, mlp_ratio=4, seed=0):
    """A GPT-style decoder: byte ids `[batch, seq_len]` to next-byte logits `[batch, seq_len, 256]`.

    Pre-norm blocks of causal multi-head self-attention and a GELU MLP, each
    with a residual connection, then a final LayerNorm and a projection to the
    256 byte values. Built from Keras layers (a functional model, so
    `keras.models.clone_model` and therefore `keras_fda.Simulation` take it).
    """
    if dim % heads:
        raise ValueError(f"dim={dim} is not a multiple of heads={heads}.")
    init = keras.initializers.RandomNormal(stddev=0.02, seed=seed)
    tokens = keras.Input((seq_len,), dtype="int32", name="bytes")
    x = keras.layers.Embedding(256, dim, embeddings_initializer=init, name="byte_embedding")(tokens)
    x = PositionEmbedding(seq_len, name="position_embedding")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_norm1")(x)
        h = keras.layers.MultiHeadAttention(
            heads, dim // heads, kernel_initializer=init, name=f"block{i}_attention"
        )(h, h, use_causal_mask=True)
        x = keras.layers.Add(name=f"block{i}_residual1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_norm2")(x)
        h = keras.layers.Dense(
            mlp_ratio * dim, activation="gelu", kernel_initializer=init, name=f"block{i}_mlp_in"
        )(h)
        h = keras.layers.Dense(dim, kernel_initializer=init, name=f"block{i}_mlp_out")(h)
        x = keras.layers.Add(name=f"block{i}_residual2")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(256, kernel_initializer=init, name="logits")(x)
    return keras.Model(tokens, logits, name="byte_gpt")


def learning_rate_schedule(steps, peak, warmup_steps, final_fraction=0.1):
    """Warmup + cosine: linear from 0 to `peak`, then cosine decay to `final_fraction * peak`."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, steps - warmup_steps),
        alpha=final_fraction,
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


def compile_model(model, *, steps, learning_rate, warmup_steps, weight_decay=0.1):
    """Compiles with AdamW (warmup + cosine, global-norm clipping at 1) and cross-entropy on logits.

    Returns the model.
    """
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate_schedule(steps, learning_rate, warmup_steps),
            weight_decay=weight_decay, beta_2=0.95, global_clipnorm=1.0,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )  # fmt: skip
    return model


def perplexity(loss):
    """Perplexity per byte of a mean cross-entropy in nats (inf where it overflows)."""
    return math.exp(loss) if loss < 700 else math.inf


# --- The command line (flags are defined only when run as a program) ---


def define_flags():
    """Defines the program's absl flags; called only when the file runs as a program."""
    from absl import flags

    flags.DEFINE_integer("steps", 800, "Training steps (the same on every worker).", lower_bound=1)
    flags.DEFINE_string(
        "trigger", "auto",
        "When to average: auto (FDA, threshold='auto'), periodic (every --tau steps, "
        "DiLoCo's H), synchronous (every step), or a number: FDA's threshold Theta.",
    )  # fmt: skip
    flags.DEFINE_integer("tau", 64, "Steps between syncs for --trigger=periodic.", lower_bound=1)
    flags.DEFINE_enum(
        "outer", None, ["none", "nesterov"],
        "What a sync does with the average: nesterov (DiLoCo's outer Nesterov step; the default "
        "except with --trigger=synchronous) or none (adopt the plain average).",
    )  # fmt: skip
    # absl.logging already defines --log_dir (for log files it writes only when
    # told to, which this program never does); it is the dashboard's folder here.
    flags.FLAGS["log_dir"].help = "FDA dashboard (TensorBoard) folder; the chief writes it."
    flags.DEFINE_integer("seq_len", 128, "Bytes per example (the context).", lower_bound=2)
    flags.DEFINE_integer("dim", 128, "Model width.", lower_bound=1)
    flags.DEFINE_integer("layers", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_integer("heads", 4, "Attention heads (must divide --dim).", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Examples per worker per step.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 2e-3, "AdamW's peak learning rate.", lower_bound=0)
    flags.DEFINE_integer(
        "warmup_steps", None, "Linear warmup steps; default 10% of --steps.", lower_bound=0
    )
    flags.DEFINE_float("weight_decay", 0.1, "AdamW's decoupled weight decay.", lower_bound=0)
    flags.DEFINE_integer(
        "bytes_per_worker", 1_000_000, "Cap on each worker's training bytes.", lower_bound=1024
    )
    flags.DEFINE_integer(
        "val_bytes", 131_072, "Cap on the held-out modules' validation bytes.", lower_bound=1024
    )
    flags.DEFINE_integer("log_every", 50, "Print the chief's training loss every N steps.",
                         lower_bound=1)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "Seed of the module split, initialization and data order.")


def callback_args(flag_values):
    """The FDACallback arguments the flags give; raises app.UsageError on a bad combination.

    Runs before TensorFlow starts and any data is read, so that a mistyped
    command fails at once with the flags to pass, not with a traceback.
    """
    from absl import app

    f = flag_values
    trigger = f.trigger
    if f["tau"].present and trigger != "periodic":
        raise app.UsageError(
            f"--tau is used only by --trigger=periodic; --trigger={trigger} would ignore it. "
            "Remove --tau."
        )
    if trigger == "synchronous" and f.outer == "nesterov":
        raise app.UsageError(
            "--trigger=synchronous averages after every step; an outer Nesterov step there is "
            "not DiLoCo. Use --trigger=periodic --tau=H (or auto) with --outer=nesterov."
        )
    if f.dim % f.heads:
        raise app.UsageError(f"--heads={f.heads} must divide --dim={f.dim}.")
    warmup = f.warmup_steps if f.warmup_steps is not None else f.steps // 10
    if warmup >= f.steps:
        raise app.UsageError(
            f"--warmup_steps={warmup} leaves no step of the cosine decay: use fewer than "
            f"--steps={f.steps}."
        )
    outer = f.outer or ("none" if trigger == "synchronous" else "nesterov")
    args = {"outer_optimizer": None if outer == "none" else "nesterov"}
    if trigger == "auto":
        args["threshold"] = "auto"
    elif trigger == "periodic":
        args.update(trigger="periodic", tau=f.tau)
    elif trigger == "synchronous":
        args["trigger"] = "synchronous"
    else:
        try:
            threshold = float(trigger)
        except ValueError:
            threshold = math.nan
        if not (math.isfinite(threshold) and threshold > 0):
            raise app.UsageError(
                f"--trigger={trigger}: use auto, periodic, synchronous or a positive number "
                "(FDA's threshold, e.g. --trigger=2.5)."
            )
        args["threshold"] = threshold
    return args


def main(argv):
    """Trains on this worker's share with FDACallback and reports the averaged model."""
    del argv
    from absl import flags

    f = flags.FLAGS
    args = callback_args(f)
    import keras_fda

    # TensorFlow's collective runtime must start before any other TF op.
    cluster = keras_fda.connect()
    import tensorflow as tf

    # TF logs every collective it traces at INFO level; keep the output readable.
    tf.get_logger().setLevel("WARNING")
    warmup = f.warmup_steps if f.warmup_steps is not None else f.steps // 10
    start = time.perf_counter()
    modules = stdlib_modules()
    (x, y), mine = load_worker_data(
        cluster.worker_index, cluster.num_workers, seq_len=f.seq_len,
        max_bytes=f.bytes_per_worker, seed=f.seed, modules=modules,
    )  # fmt: skip
    (x_val, y_val), held_out = load_validation_data(
        seq_len=f.seq_len, max_bytes=f.val_bytes, seed=f.seed, modules=modules
    )
    print(
        f"worker {cluster.worker_index}: {x.size} training bytes from {len(mine)} modules "
        f"({', '.join(mine[:4])}, ...), read in {time.perf_counter() - start:.2f} s",
        flush=True,
    )
    # The same initial weights on every worker (the seed, not the index), as
    # data-parallel training starts; the data order is each worker's own.
    keras.utils.set_random_seed(f.seed)
    model = compile_model(
        make_model(seq_len=f.seq_len, dim=f.dim, layers=f.layers, heads=f.heads, seed=f.seed),
        steps=f.steps, learning_rate=f.learning_rate, warmup_steps=warmup,
        weight_decay=f.weight_decay,
    )  # fmt: skip
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=f.seed + cluster.worker_index)
        .repeat()
        .batch(f.batch_size, drop_remainder=True)
    )
    fda = keras_fda.FDACallback(log_dir=f.log_dir or None, **args)
    timer = _Throughput(f.log_every, cluster.is_chief)
    if cluster.is_chief:
        print(
            f"workers: {cluster.num_workers}, trigger: {fda.trigger}, outer: "
            f"{args['outer_optimizer'] or 'none'}, parameters: {model.count_params():,}, "
            f"validation: {x_val.size} bytes from {len(held_out)} held-out modules",
            flush=True,
        )
    # One "epoch" of all the steps: the learning rate follows the optimizer's
    # iterations, and an epoch boundary would only add a log line.
    model.fit(
        dataset, epochs=1, steps_per_epoch=f.steps, callbacks=[fda, timer], verbose=0,
        shuffle=False,  # tf.data shuffles; Keras warns that its own shuffle would be ignored
    )

    # After fit every worker holds the same averaged model, so each one's
    # validation loss is the same: printed by all, as a check.
    loss = model.evaluate(x_val, y_val, batch_size=64, verbose=0)
    print(
        f"worker {cluster.worker_index}: validation loss {loss:.4f}, perplexity "
        f"{perplexity(loss):.3f}, bits per byte {loss / math.log(2):.3f}",
        flush=True,
    )
    if cluster.is_chief:
        tokens = f.batch_size * f.seq_len
        rate = timer.tokens_per_second(tokens)
        stats = fda.communication
        print(
            f"tokens/s: {rate:,.0f} per worker, {rate * cluster.num_workers:,.0f} all workers "
            f"(steps after the first; {timer.seconds:.1f} s of training)"
        )
        print(f"syncs: {stats.syncs} in {stats.steps} steps")
        print(stats.summary(), flush=True)


class _Throughput(keras.callbacks.Callback):
    """Times the steps after the first (which traces and compiles) and prints progress."""

    def __init__(self, log_every, verbose):
        super().__init__()
        self.log_every, self.verbose = log_every, verbose
        self.times = []
        self.seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        self.seconds = self.times[-1] - self.times[0]
        if self.verbose and (batch + 1) % self.log_every == 0:
            logs = logs or {}
            print(
                f"step {batch + 1}: train loss {logs.get('loss', math.nan):.4f}, "
                f"syncs {int(logs.get('fda/syncs', 0))}",
                flush=True,
            )

    def tokens_per_second(self, tokens_per_step):
        """Training tokens per second of this worker, from the second step's end to the last's."""
        if len(self.times) < 2 or self.seconds <= 0:
            return math.nan
        return (len(self.times) - 1) * tokens_per_step / self.seconds


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
