"""The network harness (benchmarks/network.py): real worker processes in namespaces behind tc links.

The harness needs root (network namespaces, veth pairs, tc); CI runs as root.
Every run is bounded by `Network.run(timeout=...)`, which stops the workers by
process group.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import network  # noqa: E402

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="benchmarks/network.py needs root (network namespaces, veth pairs, tc)",
)
ALLREDUCE = str(ROOT / "benchmarks" / "network_allreduce.py")
RATE_MBIT = 20
MEGABYTES = 4  # 1.6 s per all-reduce at 20 Mbit/s: the link, not the CPUs, sets the time
TIMEOUT = 240


def our_namespaces(net):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [n for n in [net.bridge_ns, *net.worker_ns] if n in listed.split()]


def allreduce(rate_mbit=None, delay_ms=0.0, megabytes=MEGABYTES):
    with network.Network(2, rate_mbit=rate_mbit, delay_ms=delay_ms, echo=False) as net:
        results = net.run(
            [sys.executable, ALLREDUCE, f"--megabytes={megabytes}"], timeout=TIMEOUT
        )
    assert not our_namespaces(net)
    reports = []
    for r in results:
        assert r.returncode == 0, "\n".join(r.lines[-40:])
        lines = [line for line in r.lines if line.startswith("NETWORK_ALLREDUCE ")]
        assert len(lines) == 1, "\n".join(r.lines[-40:])
        reports.append(json.loads(lines[0].split(" ", 1)[1]))
    assert all(report["correct"] for report in reports), reports
    return reports


@needs_root
def test_a_large_all_reduce_runs_at_the_link_rate():
    unlimited = allreduce()
    limited = allreduce(rate_mbit=RATE_MBIT)
    for fast, slow in zip(unlimited, limited):
        # A ring all-reduce over 2 workers sends each worker's half twice: the
        # payload once per worker, plus TCP/IP and gRPC framing.
        assert slow["large_tx_bytes"] >= 0.98 * slow["payload_bytes"], slow
        wire_mbit = 8 * slow["large_tx_bytes"] / slow["large_seconds"] / 1e6
        # tbf cannot send faster than its rate (the 32 KiB bucket is under 1%
        # of the payload); a transfer that idles part of the time is slower,
        # but not by half.
        assert 0.4 * RATE_MBIT <= wire_mbit <= 1.02 * RATE_MBIT, (wire_mbit, slow)
        assert slow["large_seconds"] > 4 * fast["large_seconds"], (fast, slow)


@needs_root
def test_the_relay_delays_every_exchange_and_keeps_the_bytes():
    delay_ms = 30
    reports = allreduce(delay_ms=delay_ms, megabytes=1)
    for report in reports:
        # A worker cannot know the other's value before it crossed the link once.
        assert report["small_seconds"] >= delay_ms / 1e3, report


@needs_root
def test_namespaces_are_removed_on_failure_and_timeout():
    with pytest.raises(RuntimeError, match="boom"):
        with network.Network(2, rate_mbit=10, delay_ms=5, echo=False) as net:
            assert len(our_namespaces(net)) == 3
            relay = net._relay
            raise RuntimeError("boom")
    assert not our_namespaces(net)
    assert relay.poll() is not None

    with network.Network(2, echo=False) as net:
        failed = net.run([sys.executable, "-c", "import os, sys; sys.exit(3 + int(os.environ["
                          "'TF_CONFIG'].count('\"index\": 1')))"], timeout=TIMEOUT)
        assert [r.returncode for r in failed] in ([3, 4], [3, -15], [-15, 4])
        hung = [sys.executable, "-c", "import time; time.sleep(600)"]
        with pytest.raises(TimeoutError):
            net.run(hung, timeout=2)
        assert not net._procs
    assert not our_namespaces(net)


def test_without_root_the_message_says_so(monkeypatch):
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    with pytest.raises(network.NetworkError, match="needs root"):
        network.Network(2).open()


def test_tf_config_routes_peers_through_the_relay_only_with_a_delay():
    direct = network.Network(3)
    assert direct.tf_config(1)["cluster"]["worker"] == [
        "10.77.0.1:23400", "10.77.0.2:23401", "10.77.0.3:23402"
    ]
    delayed = network.Network(3, delay_ms=25)
    config = delayed.tf_config(1)
    assert config["task"] == {"type": "worker", "index": 1}
    assert config["cluster"]["worker"] == [
        "10.77.0.254:23400", "10.77.0.2:23401", "10.77.0.254:23402"
    ]
    with pytest.raises(ValueError, match="rate_mbit"):
        network.Network(2, rate_mbit=0)
