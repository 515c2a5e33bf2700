"""The figure of benchmarks/results/regimes_diagnosis.md from regimes_explore.py pickles.

    python benchmarks/explore/regimes_diagplot.py PICKLE_DIR OUT.png

PICKLE_DIR holds cos01.pkl-style files: cos01b.pkl (cosine) and const01b.pkl (constant), each
with runs diag:16, diag:16,A-B for the four windows and exact:1e-5, 4e-5, 1.6e-4.
"""
import pickle, numpy as np, sys
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
def lr_at(t, kind, steps=512):
    k, _, v = kind.partition(":"); v = float(v)
    if k == "constant": return v
    w = steps // 10
    if t < w: return v * t / w
    return v * 0.5 * (1 + np.cos(np.pi * (t - w) / (steps - w)))
fig, axes = plt.subplots(2, 2, figsize=(13, 8))
for col, (f, lr, title) in enumerate([("cos01b.pkl", "cosine:3e-3", "Dirichlet 0.1, warmup + cosine 3e-3"), ("const01b.pkl", "constant:1e-3", "Dirichlet 0.1, constant 1e-3")]):
    out = pickle.load(open(f"{sys.argv[1]}/{f}", "rb"))
    d = out["diag:16"]["d"]
    ax = axes[0, col]
    t = np.arange(1, 513)
    ax.plot(t, out["diag:16"]["stat"] / d, lw=0.8, label="exact variance / d, periodic tau=16")
    for i, (spec, y) in enumerate([("exact:1e-5", 3e-4), ("exact:4e-5", 4e-4), ("exact:1.6e-4", 5e-4)]):
        s = np.flatnonzero(out[spec]["synced"]) + 1
        ax.scatter(s, np.full(len(s), y), marker="|", s=60, label=f"syncs of FDA exact {spec.split(':')[1]} d ({len(s)})")
    ax.set_yscale("log"); ax.set_ylim(1e-8, 2e-3); ax.set_xlabel("step"); ax.set_ylabel("variance / d")
    ax2 = ax.twinx(); ax2.plot(t, [lr_at(x, lr) for x in t], color="k", ls="--", lw=1); ax2.set_ylabel("learning rate (dashed)")
    ax.set_title(title, fontsize=9); ax.legend(fontsize=7, loc="lower left")
    ax = axes[1, col]
    log = out["diag:16"].get("log")
    syn = np.flatnonzero(out["diag:16"]["synced"])
    st = out["diag:16"]["stat"]
    ax.plot(syn + 1, st[syn] / np.maximum(log[syn, 1], 1e-30), marker=".", label="rho = Var / ||mean update||^2 at each sync (tau=16)")
    full = out["diag:16"]["ev"]["accuracy"][-1]
    for w in ["0-128", "128-256", "256-384", "384-512"]:
        a, b = map(int, w.split("-"))
        r = out.get(f"diag:16,{w}")
        if r is None: continue
        cost = 100 * (full - r["ev"]["accuracy"][-1]); v = r["stat"][a:b].max() / d
        ax.bar((a + b) / 2, cost / (v * 1e3), width=100, alpha=0.3, color="C3")
        ax.text((a + b) / 2, cost / (v * 1e3), f"{cost:+.1f} pt\n@{v:.1e} d", ha="center", fontsize=7)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step"); ax.set_ylabel("rho; bars: final-accuracy points lost per 1e-3 d of variance")
    ax.set_title("skipping the syncs of one window of periodic tau=16: points lost per unit of variance", fontsize=8)
    ax.legend(fontsize=7)
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=100)
