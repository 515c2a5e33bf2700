"""Exploration runs behind benchmarks/results/regimes_diagnosis.md (as run; not a polished benchmark).

    python benchmarks/explore/regimes_explore.py '{"lr": "cosine:3e-3", "runs": ["sync",
        "nosync", "periodic:16", "diag:16", "diag:16,0-128", "exact:1e-5"], "out": "/tmp/x.pkl"}'

Run specs: sync, nosync, periodic:TAU, exact|linear|naive:C (Theta = C * d),
diag:TAU[,A-B...] (periodic TAU whose syncs are skipped in steps (A, B]; logs the
exact variance, mean ||u_k||^2 and ||mean u||^2 every step), auto:EXPR (a Python
expression building an AutoFDA). Config keys: lr (constant:R | cosine:PEAK),
partition (dirichlet:ALPHA | by_writer), steps (512), drift (rotate at mid-run), K.
Writes a pickle of every run's evaluations, statistic and sync steps.
"""
import os, sys, json, time, pickle
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import numpy as np, keras, tensorflow as tf
import keras_fda, models
from keras_fda import partition, triggers
from keras_fda.drivers.simulation import Simulation
from comm_to_accuracy import load_task

def build(lr, steps, classes=10, seed=0, name="lenet5"):
    keras.utils.set_random_seed(seed)
    model = {"lenet5": models.lenet5, "cnn": models.cnn}[name](classes)
    kind, _, val = lr.partition(":")
    if kind == "constant":
        rate = float(val)
    else:
        peak = float(val)
        w = steps // 10
        rate = keras.optimizers.schedules.CosineDecay(0.0, steps - w, alpha=0.0, warmup_target=peak, warmup_steps=w)
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], jit_compile=False)
    return model

class Diag(triggers.SyncTrigger):
    """Syncs every tau steps except inside skip windows; statistic = exact variance."""
    name = "diag"
    def __init__(self, tau, skip=(), num_steps=None):
        self.est = keras_fda.estimators.get("exact")
        self.tau, self.skip = tau, skip
        self.threshold = float(tau)
        self.t = tf.Variable(0, dtype=tf.int64)
        self.log = tf.Variable(tf.zeros([num_steps or 4096, 2]))
    def build(self, shapes): self.est.build(shapes)
    @property
    def state_size(self): return self.est.state_size
    def local_state(self, drift, rs): return self.est.local_state(drift, rs)
    def statistic(self, mean_state, since):
        t = self.t + 1
        self.log.scatter_nd_update([[t - 1]], [tf.stack([mean_state[0], tf.reduce_sum(tf.square(mean_state[1:]))])])
        return self.est.estimate(mean_state)
    def should_sync(self, stat, since):
        t = self.t.assign_add(1)
        skipping = tf.constant(False)
        for a, b in self.skip:
            skipping = skipping | ((t > a) & (t <= b))
        return (since >= self.tau) & tf.logical_not(skipping)

def main():
    cfg = json.loads(sys.argv[1])
    task = cfg.get("task", "digits"); K = cfg.get("K", 10); steps = cfg.get("steps", 512)
    data = dict(np.load(os.path.join(ROOT, "..", "shared", "data", "femnist_subset.npz")))
    x, y, writers, xt, yt, classes = load_task(data, task, 400)
    model = build(cfg["lr"], steps, classes, name=cfg.get("model", "lenet5"))
    d = model.count_params()
    sim = Simulation(model, K)
    part = cfg.get("partition", "dirichlet:0.1")
    kind, _, a = part.partition(":")
    parts = partition.dirichlet(y, K, float(a), seed=0) if kind == "dirichlet" else partition.by_writer(writers, K, seed=0)
    rep = None
    if cfg.get("drift"):
        rep = {steps // 2: parts[1:] + parts[:1]}
    out = {}
    for spec in cfg["runs"]:
        fam, _, p = spec.partition(":")
        if fam == "sync": trig = keras_fda.Synchronous()
        elif fam == "nosync": trig = keras_fda.Periodic(10**9)
        elif fam == "periodic": trig = keras_fda.Periodic(int(p))
        elif fam in ("exact", "linear", "naive"): trig = keras_fda.FDA(fam, threshold=float(p) * d)
        elif fam == "diag":
            tau, *wins = p.split(",")
            trig = Diag(int(tau), [tuple(map(int, w.split("-"))) for w in wins])
        elif fam == "auto":
            trig = eval(p, {"AutoFDA": triggers.AutoFDA})
        t0 = time.time()
        h = sim.run(trig, x, y, parts, batch_size=32, steps=steps, evaluations_per_epoch=cfg.get("epe", 8),
                    validation_data=(xt, yt), seed=0, repartition=rep)
        ev = h.evaluations
        print(f"{spec}: final {ev['accuracy'][-1]:.4f} max {ev['accuracy'].max():.4f} syncs {ev['syncs'][-1]} {time.time()-t0:.0f}s", flush=True)
        out[spec] = dict(ev=ev, stat=h.statistic, synced=h.synced, d=d, K=K)
        if fam == "diag": out[spec]["log"] = trig.log.numpy()[:steps]
        with open(cfg["out"], "wb") as f: pickle.dump(out, f)
main()
