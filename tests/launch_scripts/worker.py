"""A stand-in worker for tests/test_launch.py; no TensorFlow, so it starts fast.

Usage: worker.py PID_DIR BEHAVIOURS [ARGS...]

Writes its PID to PID_DIR/<index>.pid, prints its argv, TF_CONFIG and network
namespace as JSON on stdout and a line on stderr, then does what the comma-separated BEHAVIOURS
entry at its worker index says:
    N: exit with code N.
    hang: block until killed.
    stubborn: ignore SIGTERM and block until killed.
    wait_then_N: wait until every worker wrote its PID file, then exit with
        code N (so that the test knows the PIDs of the workers to be stopped).
    lines_MB: print two lines of MB megabytes each, in 1 MB writes, then wait
        until the file PID_DIR/go exists, then exit 0.
    grandchildren: start two processes that block until killed, one in this
        worker's process group, one in a process group of its own (in the
        worker's session), write their PIDs to PID_DIR/<index>.grandchildren
        (JSON), then block until killed.
    progress: print a progress line redrawn with "\r" (5 states), then wait
        until the file PID_DIR/go exists, then end the line and exit 0.
"""

import json
import os
import signal
import subprocess
import sys
import time

pid_dir, behaviours = sys.argv[1], sys.argv[2].split(",")
tf_config = json.loads(os.environ["TF_CONFIG"])
index = tf_config["task"]["index"]

# Written under a temporary name then renamed: a reader never sees half a PID.
pid_file = os.path.join(pid_dir, f"{index}.pid")
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)

netns = os.readlink("/proc/self/ns/net")
print(json.dumps({"argv": sys.argv[3:], "tf_config": tf_config, "netns": netns}))
print(f"stderr of worker {index}", file=sys.stderr)

# Safety net should the launcher under test fail to stop us: SIGALRM's
# default action ends the process, so no test can leak a worker for long.
signal.alarm(120)
behaviour = behaviours[index]
if behaviour.startswith("lines_"):
    megabyte = b"x" * 2**20
    for _ in range(2):
        for _ in range(int(behaviour[len("lines_") :])):
            sys.stdout.buffer.write(megabyte)
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    behaviour = "progress_end"
if behaviour == "progress":
    for step in range(1, 6):
        sys.stdout.write(f"\b\b\b\r{step}/5 of worker {index}")
        sys.stdout.flush()
    behaviour = "progress_end"
if behaviour == "progress_end":
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(pid_dir, "go")) and time.monotonic() < deadline:
        time.sleep(0.01)
    if behaviours[index] == "progress":
        print(f"\rdone: worker {index}")
    sys.exit(0)
if behaviour.startswith("wait_then_"):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(pid_dir, f"{i}.pid")) for i in range(len(behaviours))
    ):
        time.sleep(0.01)
    sys.exit(int(behaviour[len("wait_then_") :]))
if behaviour == "grandchildren":
    # Each with its own 120 s safety net, like this worker's.
    block = [sys.executable, "-I", "-S", "-c", "import signal; signal.alarm(120); signal.pause()"]
    children = [
        subprocess.Popen(block, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL),
        subprocess.Popen(block, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         process_group=0),
    ]
    path = os.path.join(pid_dir, f"{index}.grandchildren")
    with open(path + ".tmp", "w") as f:
        json.dump([c.pid for c in children], f)
    os.replace(path + ".tmp", path)
    behaviour = "hang"
if behaviour in ("hang", "stubborn"):
    if behaviour == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        signal.pause()
sys.exit(int(behaviour))
