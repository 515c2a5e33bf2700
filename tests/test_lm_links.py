"""benchmarks/lm_links.py's arguments and report, on made-up runs (no workers, no network)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lm_links  # noqa: E402


def fake_run(name, step_ms, losses, every=4, capped=False, tx_per_step=1000, syncs=None):
    points = [{"step": every * (i + 1), "clock_s": every * (i + 1) * step_ms / 1e3,
               "syncs": every * (i + 1), "loss": loss, "tx_bytes": tx_per_step * every * (i + 1),
               "paper_bytes": None} for i, loss in enumerate(losses)]
    steps = points[-1]["step"]
    return {"method": name, "kind": "mwms" if name == "mwms" else "fda", "params": 1000,
            "steps": steps, "capped": capped, "syncs": syncs, "clock_s": points[-1]["clock_s"],
            "final_sync_s": 0.0, "fit_wall_s": 1.0, "mean_step_ms": step_ms,
            "median_step_ms": step_ms, "paper_bytes": None, "ring_wire_bytes": None,
            "tx_bytes_worker0": tx_per_step * steps, "tx_bytes_total": 2 * tx_per_step * steps,
            "points": points, "load": [1.0, 1.0, 1.0]}


def fake_link():
    losses = [4.0, 3.5, 3.0, 2.8]
    return {
        "local": fake_run("local", 10.0, [losses[-1] + 0.5]),
        "mwms": fake_run("mwms", 50.0, losses),
        "synchronous": fake_run("synchronous", 40.0, losses),
        lm_links.RECOMMENDED: fake_run(lm_links.RECOMMENDED, 11.0, [3.6, 2.8], every=8, syncs=2),
        "diloco-H8": fake_run("diloco-H8", 12.0, [3.4, 2.82], every=8, syncs=2),
        "local-again": fake_run("local-again", 12.0, [losses[-1] + 0.5]),
    }


def test_parse_args_and_methods():
    args = lm_links.parse_args(["--links", "0:0,10:50", "--steps", "48", "--eval_every", "16"])
    assert args.links == [(None, 0.0), (10.0, 50.0)] and args.taus == [32, 128]
    names = [m["name"] for m in lm_links.methods(48, [32], only=None)]
    assert names[0] == "local" and names[-1] == "local-again" and "mwms" in names
    assert {"diloco-H32", "auto", lm_links.RECOMMENDED} <= set(names)
    spec = lm_links.worker_spec(lm_links.parse_args(["--methods", "local,mwms"]))
    assert [m["name"] for m in spec["methods"]] == ["local", "mwms", "local-again"]
    with pytest.raises(SystemExit):
        lm_links.parse_args(["--steps", "50", "--eval_every", "16"])


def test_targets_rows_and_goals():
    runs = fake_link()
    targets = lm_links.targets_of(runs["synchronous"], 16)
    assert targets[:2] == [4.0, 3.5] and targets[2] == pytest.approx(2.8 * 1.01)
    rows = {r["method"]: r for r in lm_links.run_rows(runs, targets, 16)}
    assert lm_links.bound(runs) == pytest.approx(50 / 11)
    rec = rows[lm_links.RECOMMENDED]
    assert rec["hits"][-1]["step"] == 16 and rec["speedup_vs_mwms"] == pytest.approx(50 / 11)
    assert rec["utilization"] == pytest.approx(15 * 11 / (16 * 11))
    assert math.isnan(rows["mwms"]["hit_speedup"][0]) is False
    goals = lm_links.goal_lines([((None, 0.0), runs, {})], targets, 16)
    assert "**met**" in goals[0]  # utilization 94%, 100% of a bound under 5x
    runs[lm_links.RECOMMENDED] = fake_run(lm_links.RECOMMENDED, 30.0, [3.6, 2.8], every=8)
    assert "**missed**" in lm_links.goal_lines([((None, 0.0), runs, {})], targets, 16)[0]
    assert len(lm_links.link_table(runs, targets, 16)) == 2 + len(runs)


def test_report_from_json(tmp_path):
    raw = {"command": "python benchmarks/lm_links.py --steps 16", "started": "2026-12-07T05:00:00",
           "settings": {"steps": 16, "budget_s": 90.0, "budget_methods": "mwms,synchronous",
                        "eval_every": 4, "workers": 2},
           "results": [[[0, 0.0], fake_link(),
                        {"link": [None, 0.0], "loads": [], "uptime": ["a", "b"], "wall_s": 1}]]}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(raw))
    assert lm_links.main(["--from_json", str(path), "--out_dir", str(tmp_path), "--name", "x",
                          "--steps", "16", "--eval_every", "4"]) == 0
    text = (tmp_path / "x.md").read_text()
    assert "largest speedup" in text and lm_links.RECOMMENDED in text
    assert (tmp_path / "x.csv").read_text().count("\n") == 1 + sum(
        len(r["points"]) for r in fake_link().values())
