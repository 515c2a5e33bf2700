"""Exploration runs behind benchmarks/results/issue13_report.md (as run; not a polished benchmark).

    python benchmarks/explore/auto_explore.py dir0.1-const out.csv \
        'periodic:96' 'rule:sqrt,h=256,f=16' 'rule:monofloor,h=180,f=32'

Same harness as comm_to_accuracy.py --preset=regimes (LeNet-5 digits, K=10, Adam,
batch 32, 504 steps, 6 evaluations per epoch, seed 0; env STEPS, K, SEED, MODEL (cnn),
TASK (femnist62); env OUTER=LR adds an outer SGD(LR, momentum=0.9, nesterov=True) at every sync).
Each spec: sync, nosync, periodic:TAU, auto, or rule:NAME,key=value,... (an AutoFDA variant
below). Appends comm_to_accuracy-format CSV rows (family: comm_to_accuracy's for sync,
nosync, periodic and auto, so that `comm_to_accuracy.py --summarize` reads them; else the
spec; "+nesterov" with OUTER) and prints, per
run, final accuracy, syncs, sync steps and the per-round log (rho, round length, next L).
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import csv  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_fda  # noqa: E402
import models  # noqa: E402
from keras_fda.policies import estimators as estimators_lib  # noqa: E402
from keras_fda.policies import triggers  # noqa: E402
from keras_fda.drivers.simulation import Simulation  # noqa: E402
from comm_to_accuracy import (  # noqa: E402
    REGIMES, learning_rate, load_task, make_partitions, repartition,
)


class Variant(triggers.AutoFDA):
    """AutoFDA with a pluggable end_round rule; control = [1/Theta, 1/floor, 1/cap, L]."""

    def __init__(self, rule, h=90.0, f=16, **kw):
        super().__init__("linear", horizon=float(h), first_round=int(f))
        self.rule, self.kw = rule, {k: float(v) for k, v in kw.items()}
        self.log = tf.Variable(tf.zeros([256, 5]))
        self.n = tf.Variable(0)

    @property
    def state_size(self):
        return self.estimator.state_size + 4

    def initial_round_state(self):
        f = float(self.first_round)
        control = tf.constant([0.0, 0.0, 1.0 / f, f], tf.float32)
        return [*self.estimator.initial_round_state(), control]

    def statistic(self, mean_state, steps_since_sync):
        variance = self.estimator.estimate(mean_state[:-4])
        s = tf.cast(steps_since_sync, tf.float32)
        by_cap = tf.round(s * mean_state[-2] * 1e4) / 1e4
        floor_ok = tf.round(s * mean_state[-3] * 1e4) / 1e4 >= 1.0
        return tf.where(floor_ok, tf.maximum(variance * mean_state[-4], by_cap), by_cap)

    def end_round(self, round_state, global_step, mean_state=None, round_steps=None):
        rounds, control = list(round_state[:-1]), round_state[-1]
        next_rounds = self.estimator.next_round_state(rounds, global_step)
        if mean_state is None or round_steps is None:
            return [*next_rounds, control]
        E = tf.cast(round_steps, tf.float32)
        progress = estimators_lib.squared_norm(global_step)
        var = tf.maximum(mean_state[0] - progress, 0.0)
        rho = tf.maximum(var / tf.maximum(progress, 1e-30), 1e-30)
        v_est = self.estimator.estimate(mean_state[:-4])
        L_prev = control[3]
        h, kw = self.horizon, self.kw
        inf = tf.constant(1e30)
        if self.rule == "sqrt":  # the committed rule
            L = tf.maximum(h / tf.sqrt(rho), 1.0)
            floor, cap, theta = tf.constant(0.0), L, v_est * L / E
        elif self.rule == "monotarget":  # targets never shrink; variance may end early
            L = tf.maximum(L_prev, h / tf.sqrt(rho))
            floor, cap, theta = tf.constant(0.0), L, v_est * L / E
        elif self.rule == "mq":  # monotone target, variance guard extrapolated quadratically
            L = tf.maximum(L_prev, h / tf.sqrt(rho))
            floor, cap, theta = tf.constant(0.0), L, v_est * tf.square(L / E)
        elif self.rule == "monofloor":  # rounds never shorter than the last one
            L = tf.maximum(E, h / tf.sqrt(rho))
            floor, cap, theta = E, L, v_est * L / E
        elif self.rule == "double":  # period doubles while the workers agree (rho < a)
            a = kw.get("a", 1.0)
            L = tf.where(rho < a, 2.0 * L_prev, L_prev)
            floor, cap, theta = L, L, inf
        elif self.rule == "sqrtmono":  # h/sqrt(rho) but never below the last target
            L = tf.maximum(L_prev, h / tf.sqrt(rho))
            floor, cap, theta = L, L, inf
        else:
            raise ValueError(self.rule)
        L = tf.minimum(L, kw.get("maxL", 1e6))
        cap = tf.minimum(cap, kw.get("maxL", 1e6))
        i = self.n.assign_add(1) - 1
        self.log.scatter_nd_update([[tf.minimum(i, 255)]], [tf.stack([E, rho, L, var, progress])])
        inv = lambda x: tf.where(x > 0, 1.0 / tf.maximum(x, 1e-30), 0.0)  # noqa: E731
        return [*next_rounds, tf.stack([inv(theta), inv(floor), inv(cap), L])]


def trigger_for(spec):
    fam, _, p = spec.partition(":")
    if fam == "sync":
        return keras_fda.Synchronous()
    if fam == "nosync":
        return keras_fda.Periodic(2**62)
    if fam == "periodic":
        return keras_fda.Periodic(int(p))
    if fam == "auto":
        return triggers.get("fda", threshold="auto")
    if fam == "rule":
        name, *kvs = p.split(",")
        return Variant(name, **dict(kv.split("=") for kv in kvs))
    if fam == "autoargs":
        return triggers.AutoFDA("linear", **{k: float(v) for k, v in
                                            (kv.split("=") for kv in p.split(","))})
    raise ValueError(spec)


def family(spec, outer):
    """(family, param) in comm_to_accuracy.py's CSV format."""
    fam, _, p = spec.partition(":")
    name, param = {"sync": ("synchronous", 0.0), "nosync": ("no-sync", 0.0),
                   "auto": ("fda-auto", 0.0)}.get(fam, (spec, 0.0))
    if fam == "periodic":
        name, param = "periodic", float(p)
    return (f"{name}+nesterov" if outer else name), param


def main():
    regime, out, *specs = sys.argv[1:]
    partition_spec, lr_spec, drift_spec = REGIMES[regime]
    K = int(os.environ.get("K", 10))
    model_name = os.environ.get("MODEL", "lenet5")
    seed = int(os.environ.get("SEED", 0))
    data = dict(np.load(os.path.join(ROOT, "..", "shared", "data", "femnist_subset.npz")))
    task = os.environ.get("TASK", "digits")
    x, y, writers, xt, yt, classes = load_task(data, task, 400)
    steps = int(os.environ.get("STEPS", 4 * (len(y) // (32 * K))))
    model = models.build(model_name, classes, seed, learning_rate(lr_spec, steps))
    sim = Simulation(model, K)
    parts = make_partitions(partition_spec, writers, y, K, seed)
    new = not os.path.exists(out)
    for spec in specs:
        trig = trigger_for(spec)
        t0 = time.time()
        outer = os.environ.get("OUTER")
        if outer:
            import keras
            kwargs = {"outer_optimizer": keras.optimizers.SGD(float(outer), momentum=0.9,
                                                              nesterov=True)}
        else:
            kwargs = {}
        h = sim.run(trig, x, y, parts, batch_size=32, steps=steps, evaluations_per_epoch=6,
                    validation_data=(xt, yt), seed=seed,
                    repartition=repartition(drift_spec, parts, steps), **kwargs)
        ev = h.evaluations
        sync_steps = list(np.nonzero(np.asarray(h.synced))[0] + 1)
        print(f"{regime} {spec}: final {ev['accuracy'][-1]:.4f} syncs {ev['syncs'][-1]} "
              f"{time.time() - t0:.0f}s load {os.getloadavg()[0]:.1f}\n  at {sync_steps}",
              flush=True)
        if isinstance(trig, Variant):
            n = int(trig.n.numpy())
            for E, rho, L, var, prog in trig.log.numpy()[:min(n, 256)]:
                print(f"    E {E:5.0f} rho {rho:7.2f} next L {L:6.1f} var {var:.3g} "
                      f"prog {prog:.3g}")
        with open(out, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["task", "model", "workers", "family", "param", "regime",
                            *ev.keys()])
                new = False
            for i in range(len(ev["step"])):
                w.writerow([task, model_name, K, *family(spec, outer), regime,
                            *(v[i].item() for v in ev.values())])


if __name__ == "__main__":
    main()
