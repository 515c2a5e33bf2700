"""`python -m keras_fda.launch` with real worker processes.

Most tests run launch.py as a file with stand-in workers (launch_scripts/worker.py)
that do not import TensorFlow: `python -m keras_fda.launch` imports the
keras_fda package and with it TensorFlow, which takes seconds. A few run real
TensorFlow clusters (launch_scripts/all_reduce.py, launch_scripts/fda_fit.py).
"""

import fcntl
import json
import os
import pathlib
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest

from keras_fda.runtime import launch as launch_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "keras_fda" / "launch.py"
SCRIPTS = pathlib.Path(__file__).resolve().parent / "launch_scripts"
WORKER = SCRIPTS / "worker.py"
TIMEOUT = 30  # seconds any launcher run may take before the test fails


@pytest.fixture
def pid_dir(tmp_path):
    """Where workers write their PIDs; kills leftovers so a failing test leaks nothing."""
    yield tmp_path
    for pid in read_pids(tmp_path):
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)  # each worker leads its own process group


def read_pids(pid_dir):
    return [int(p.read_text()) for p in sorted(pid_dir.glob("*.pid"))]


def wait_for_pids(pid_dir, n):
    deadline = time.monotonic() + TIMEOUT
    while len(read_pids(pid_dir)) < n:
        assert time.monotonic() < deadline, f"workers did not all start within {TIMEOUT} s"
        time.sleep(0.02)
    return read_pids(pid_dir)


def alive(pid):
    """True while `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def launch(*args):
    return subprocess.run(
        [sys.executable, str(LAUNCH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def worker_reports(stdout):
    """{worker index: the JSON report it printed}, checking each line's prefix."""
    reports = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition("] ")
        index = int(prefix.removeprefix("[worker "))
        if rest.startswith("{"):
            reports[index] = json.loads(rest)
    return reports


def test_exit_code_of_failed_worker_is_returned(pid_dir):
    result = launch("--workers", 2, WORKER, pid_dir, "0,3")
    assert result.returncode == 3, result
    assert "worker 1 exited with code 3" in result.stderr


def test_failed_worker_stops_the_others(pid_dir):
    start = time.monotonic()
    result = launch("--workers", 2, WORKER, pid_dir, "wait_then_5,hang")
    assert result.returncode == 5, result
    assert time.monotonic() - start < 15
    pids = read_pids(pid_dir)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_worker_ignoring_sigterm_is_killed(pid_dir):
    result = launch("--workers", 2, WORKER, pid_dir, "wait_then_1,stubborn")
    assert result.returncode == 1, result
    assert not any(alive(pid) for pid in read_pids(pid_dir))


def test_output_is_prefixed_and_arguments_pass_verbatim(pid_dir):
    script_args = ["--my_flag=x", "--workers", "7", "--", "-h", "two words"]
    result = launch("--workers", 2, WORKER, pid_dir, "0,0", *script_args)
    assert result.returncode == 0, result
    reports = worker_reports(result.stdout)
    assert sorted(reports) == [0, 1]
    for index, report in reports.items():
        assert report["tf_config"]["task"] == {"type": "worker", "index": index}
        assert report["argv"] == script_args
    # Worker stderr goes to the launcher's stdout, prefixed too.
    for index in (0, 1):
        assert f"[worker {index}] stderr of worker {index}" in result.stdout.splitlines()


def test_tf_config_lists_distinct_free_ports(pid_dir):
    result = launch("--workers", 3, WORKER, pid_dir, "0,0,0")
    assert result.returncode == 0, result
    reports = worker_reports(result.stdout)
    assert sorted(reports) == [0, 1, 2]
    clusters = [r["tf_config"]["cluster"] for r in reports.values()]
    assert clusters[0] == clusters[1] == clusters[2]
    addresses = clusters[0]["worker"]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert len({a.split(":")[1] for a in addresses}) == 3


def test_port_base(pid_dir):
    result = launch("--workers", 2, "--port_base", 23456, WORKER, pid_dir, "0,0")
    assert result.returncode == 0, result
    for report in worker_reports(result.stdout).values():
        assert report["tf_config"]["cluster"]["worker"] == ["127.0.0.1:23456", "127.0.0.1:23457"]


def test_timeout_stops_all_workers(pid_dir):
    result = launch("--workers", 2, "--timeout", 1, WORKER, pid_dir, "hang,hang")
    assert result.returncode == 124, result
    assert "timed out" in result.stderr
    pids = read_pids(pid_dir)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_stops_all_workers(pid_dir, sig):
    launcher = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--workers", "2", str(WORKER), str(pid_dir), "hang,hang"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = wait_for_pids(pid_dir, 2)
        launcher.send_signal(sig)
        launcher.communicate(timeout=TIMEOUT)
        assert launcher.returncode == 128 + sig
        assert not any(alive(pid) for pid in pids)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0", WORKER], "--workers must be at least 1"),
        (["--workers", "2"], "required: script"),
        (["--workers", "2", "no_such_script.py"], "is not a file"),
        (["--workers", "2", "--timeout", "0", WORKER], "--timeout must be positive"),
        (["--workers", "2", "--port_base", "65535", WORKER], "leaves no room"),
    ],
)
def test_bad_input(args, message):
    result = launch(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_real_tensorflow_cluster_all_reduces():
    result = subprocess.run(
        # --timeout: the launcher, unlike subprocess.run, stops the workers too.
        [sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "120"]
        + [str(SCRIPTS / "all_reduce.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for index in (0, 1):
        assert f"[worker {index}] mean of worker indices: [0.5]" in lines, result.stdout


def test_a_double_dash_before_the_script_keeps_the_script_arguments(pid_dir):
    result = launch("--workers", 2, "--", WORKER, pid_dir, "0,0", "--epochs=3", "--", "x")
    assert result.returncode == 0, result
    for report in worker_reports(result.stdout).values():
        assert report["argv"] == ["--epochs=3", "--", "x"]


def wait_until_gone(pids, timeout):
    """Waits (bounded) until none of `pids` runs; returns those still running.

    Waits on each process's pidfd, which becomes readable when it ends, so the
    test neither sleeps nor polls; works for processes that are not our children.
    """
    deadline = time.monotonic() + timeout
    running = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                running.append(pid)
        finally:
            os.close(fd)
    return running


def test_workers_and_what_they_started_die_with_a_killed_launcher(pid_dir):
    """SIGKILL leaves the launcher no chance to stop anything: the kernel kills its
    workers (PR_SET_PDEATHSIG), and its guard process kills what they started, in
    their process groups or in other groups of their sessions (issue 21)."""
    launcher = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--workers", "2", str(WORKER), str(pid_dir),
         "grandchildren,hang"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    grandchildren = []
    try:
        pids = wait_for_pids(pid_dir, 2)
        grandchildren_file = pid_dir / "0.grandchildren"
        deadline = time.monotonic() + TIMEOUT
        while not grandchildren_file.exists():
            assert time.monotonic() < deadline, "worker 0 started no grandchildren"
            time.sleep(0.02)
        grandchildren = json.loads(grandchildren_file.read_text())
        assert all(alive(pid) for pid in pids + grandchildren)
        launcher.kill()  # SIGKILL: the launcher cannot stop anything itself
        launcher.wait(timeout=TIMEOUT)
        assert wait_until_gone(pids + grandchildren, TIMEOUT) == [], "outlived the launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in grandchildren:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def worker0_bytes(lines):
    """Bytes worker 0 printed in its long lines. Worker 1's lines may break them;
    each piece then has its own prefix."""
    return sum(n - len("[worker 0] ") for h, n in lines if h == b"[worker 0] x")


def test_long_lines_pass_without_being_held_in_memory(pid_dir):
    """Two 64 MB lines from a worker: the launcher's memory stays far below one line."""
    launcher = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--workers", "2", str(WORKER), str(pid_dir), "lines_64,0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        lines, head, length = [], b"", 0  # (first bytes, length) of each line, not the lines
        while worker0_bytes(lines) < 2 * 64 * 2**20:
            chunk = launcher.stdout.read1(2**20)
            assert chunk, lines
            for piece in re.split(rb"(\n)", chunk):
                if piece == b"\n":
                    lines.append((head, length))
                    head, length = b"", 0
                elif piece:
                    head = head or piece[:12]
                    length += len(piece)
        # The worker now waits for "go": the launcher is still there to be measured.
        with open(f"/proc/{launcher.pid}/status") as f:
            peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))
        (pid_dir / "go").touch()
        launcher.stdout.read()
        assert launcher.wait(timeout=TIMEOUT) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert all(h.startswith(b"[worker ") for h, _ in lines), lines
    assert worker0_bytes(lines) == 2 * 64 * 2**20
    assert peak_kb < 48 * 1024, peak_kb


def test_a_worker_that_cannot_get_a_private_network_says_so_once(pid_dir):
    """Where no network namespace can be made, the launcher runs as before, and says so."""
    # A user namespace whose limit on network namespaces is 0.
    command = (
        "echo 0 > /proc/sys/user/max_net_namespaces && exec "
        f"{sys.executable} {LAUNCH} --workers 2 {WORKER} {pid_dir} 0,0"
    )
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", command],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result
    assert result.stderr.count("cannot run the workers in a private network namespace") == 1
    assert sorted(worker_reports(result.stdout)) == [0, 1]


@pytest.mark.parametrize("network", ["private", "host"])
def test_workers_share_a_private_network_namespace_unless_told(pid_dir, network):
    result = launch("--workers", 2, "--network", network, WORKER, pid_dir, "0,0")
    assert result.returncode == 0, result
    assert "private network namespace" not in result.stderr
    namespaces = {r["netns"] for r in worker_reports(result.stdout).values()}
    assert len(namespaces) == 1
    ours = os.readlink("/proc/self/ns/net")
    assert (namespaces == {ours}) == (network == "host")


# --- The console: output of several workers on one stream ---


def render(data):
    """A terminal's lines after `data`: (finished lines, the unfinished last line).

    Understands what the launcher and Keras' progress bar write: CR, LF,
    backspace, erase-to-end-of-line; other escape sequences (colours) are dropped.
    """
    rows = screen(data, columns=None)
    return rows[:-1], rows[-1]


PREFIXED = re.compile(r"\[worker \d+\] |keras_fda\.launch: ")


def labelled(text):
    """Whether a visible line carries its worker's prefix (or is being written: a prefix of one)."""
    return not text or PREFIXED.match(text) or "[worker 0] ".startswith(text[:10])


class FakeStream:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data.encode() if isinstance(data, str) else data

    def flush(self):
        pass


def console(live, terminal=True, columns=None):
    out = FakeStream()
    con = launch_lib._Console(out, out, erase=terminal, columns=columns and (lambda: columns))
    workers = [launch_lib._Worker(i, live=i in live) for i in range(2)]
    return con, workers, out


def test_a_live_progress_bar_keeps_its_prefix_and_others_print_above_it():
    con, (w0, w1), out = console(live={0})
    shown = []
    for data in [(w0, b"Epoch 1/2\n"), (w0, b"\r1/4 [=   ]"), (w1, b"Epoch 1/2\n"),
                 (w0, b"\x08\x08\x08\r2/4 [==  ]"), (w1, b"\r1/4 [=   ]"), (w1, b"\r4/4 done\n"),
                 (w0, b"\r3/4"), (w0, b" [=== ]")]:
        con.feed(*data)
        shown.append(render(out.data)[1])
    con.message("keras_fda.launch: a message\n")
    lines, last = render(out.data)
    assert shown[1] == "[worker 0] 1/4 [=   ]"  # before the epoch ends
    assert shown[3] == "[worker 0] 2/4 [==  ]"
    assert all(labelled(s) for s in shown)
    # Worker 1 (not live) shows its redrawn line once, in its final state.
    assert lines == ["[worker 0] Epoch 1/2", "[worker 1] Epoch 1/2", "[worker 1] 4/4 done",
                     "keras_fda.launch: a message"]
    assert last == "[worker 0] 3/4 [=== ]"
    con.feed(w0, b"\r4/4 [====]\n")
    assert render(out.data) == (lines + ["[worker 0] 4/4 [====]"], "")


def test_all_workers_live_take_turns_on_the_last_line():
    con, (w0, w1), out = console(live={0, 1})
    con.feed(w0, b"\r1/4")
    con.feed(w1, b"\r1/4")
    assert render(out.data) == ([], "[worker 1] 1/4")
    con.feed(w0, b"\r2/4")
    assert render(out.data) == ([], "[worker 0] 2/4")
    con.feed(w1, b"\r4/4\n")
    con.feed(w0, b"\r4/4\n")
    assert render(out.data) == (["[worker 1] 4/4", "[worker 0] 4/4"], "")


def test_without_a_terminal_each_line_appears_once_in_its_final_state():
    con, (w0, w1), out = console(live=set(), terminal=False)
    for step in range(1, 5):
        con.feed(w0, f"\x08\x08\r{step}/4".encode())
        con.feed(w1, f"\x08\x08\r{step}/4".encode())
    con.feed(w0, b"\r\n")  # "\\r\\n" ends the line with the text the "\\r" would replace
    con.feed(w1, b"\n")
    assert out.data == b"[worker 0] 4/4\n[worker 1] 4/4\n"


def test_a_long_line_streams_and_another_worker_breaks_it_with_prefixes():
    con, (w0, w1), out = console(live=set(), terminal=False)
    big = b"x" * (launch_lib._LINE_BYTES + 1)
    con.feed(w0, big)  # written at once, unfinished
    assert out.data == b"[worker 0] " + big
    con.feed(w1, b"short\n")
    con.feed(w0, b"tail\n")
    assert out.data.decode().splitlines() == [
        "[worker 0] " + big.decode(), "[worker 1] short", "[worker 0] tail"
    ]
    con.close(w1)
    assert len(w0.line) == 0 and out.data.endswith(b"tail\n")



def screen(data, columns):
    """The rows a terminal `columns` wide (None: unbounded) shows after `data`, long lines wrapped.

    As xterm: a character written past the last column starts the next row;
    CR returns to the start of the cursor's row; LF starts a new row (the
    terminal's ONLCR); erase-line clears the cursor's row from the cursor.
    """
    rows, row, column = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|\x08|\x1b|[^\r\n\x08\x1b]",
                            data.decode(errors="replace")):
        if token == "\n":
            row, column = row + 1, 0
        elif token == "\r":
            column = 0
        elif token == "\x08":
            column = max(0, column - 1)
        elif token.startswith("\x1b"):
            if token.endswith("K"):
                del rows[row][column:]
            continue
        else:
            if columns is not None and column == columns:
                row, column = row + 1, 0
                rows.append([])
            while len(rows[row]) < column:
                rows[row].append(" ")
            rows[row][column : column + 1] = [token]
            column += 1
        while len(rows) <= row:
            rows.append([])
    return ["".join(r) for r in rows]


def wrapped(line, columns):
    return [line[i : i + columns] for i in range(0, len(line), columns)]


@pytest.mark.parametrize("live", [{0}, {0, 1}], ids=["chief", "all"])
def test_live_lines_wider_than_the_terminal_are_drawn_once(live):
    """Issue 21: a live line longer than the terminal wrapped, and each redraw after
    "\r" (back to the start of the last row only) left the wrapped rows behind."""
    columns = 40
    con, (w0, w1), out = console(live=live, columns=columns)
    bar = " ━━━━━━━━━━ 1s 5ms/step - loss: 0.25 - fda/variance: 0.01"  # wider than 40
    finished = []
    for step in range(1, 6):
        for w in (w0, w1):
            con.feed(w, f"\x08\x08\r\x1b[1m{step}/5\x1b[0m{bar}".encode())
            rows = [r for r in screen(out.data, columns) if r]
            # Finished lines, then one row: the live line, cut to the width.
            assert rows[:-1] == finished, rows
            assert len(rows[-1]) < columns and rows[-1].startswith(("[worker 0]", "[worker 1]"))
    for w, index in ((w0, 0), (w1, 1)):
        con.feed(w, b"\n")
        finished += wrapped(f"[worker {index}] 5/5{bar}", columns)  # the final state, whole
    assert screen(out.data, columns) == finished + [""]


def test_fit_to_width_counts_columns_as_a_terminal_does():
    fit = launch_lib.fit_to_width
    assert fit(b"0123456789", 8) == (b"0123456", True)  # the last column stays empty
    assert fit(b"0123456", 8) == (b"0123456", False)
    assert fit(b"0123", None) == (b"0123", False)
    # Escape sequences take no room and are kept after the cut (attributes end as they would).
    assert fit(b"\x1b[1m01234\x1b[0m56789", 6) == (b"\x1b[1m01234\x1b[0m", True)
    # Wide characters take two columns; combining ones none; a backspace moves back.
    assert fit("日本語x".encode(), 6) == ("日本".encode(), True)
    assert fit("e\u0301tat".encode(), 5) == ("e\u0301tat".encode(), False)
    assert fit(b"abc\x08\x08def", 4) == (b"abc\x08\x08de", True)
    # Keras' progress bar: box-drawing characters are one column.
    assert fit("12/12 ━━━━ 0s".encode(), 40) == ("12/12 ━━━━ 0s".encode(), False)
    # Not UTF-8: byte for byte, one column each.
    assert fit(b"\xff\xfe\xfd", 3) == (b"\xff\xfe", True)


# --- Real TensorFlow jobs ---

FDA_FIT = SCRIPTS / "fda_fit.py"
FAILED_RPC = re.compile(r"E0000|Connection refused|StartAbort|stopped sending heartbeats")


class Terminal:
    """A command whose stdout and stderr are a pseudo-terminal that the test reads."""

    def __init__(self, command):
        master, slave = pty.openpty()
        # Wide enough that no line wraps.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 2000, 0, 0))
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self.screens = []  # the unfinished last line after each read
        self.closed = False

    def read_until(self, condition, timeout):
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.closed, f"output ended first: {render(self.output)}"
            assert time.monotonic() < deadline, f"timed out: {render(self.output)}"
            if select.select([self.master], [], [], 1.0)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    data = b""
                self.closed = not data
                self.output += data
                self.screens.append(render(self.output)[1])

    def finish(self, timeout):
        self.read_until(lambda: self.closed, timeout)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's workers die with it
            self.proc.wait()
        os.close(self.master)


def test_live_progress_in_a_terminal_from_a_private_network(tmp_path):
    """Worker 0's Keras progress bar shows mid-epoch, prefixed, while nobody outside
    the job's network namespace can reach the workers' ports; the job trains."""
    terminal = Terminal(
        [sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "200",
         str(FDA_FIT), "--out", str(tmp_path), "--verbose", "1", "--hold_at_step", "6"]
    )
    held = [tmp_path / f"held{i}" for i in (0, 1)]
    progress = re.compile(r"\[worker 0\] +[1-6]/12 ")
    try:
        # Both workers wait before step 7 of 12: the epoch has not ended.
        terminal.read_until(
            lambda: all(h.exists() for h in held) and progress.match(terminal.screens[-1]),
            timeout=180,
        )
        addresses = json.loads(held[0].read_text())["addresses"]
        for address in addresses:
            host, port = address.split(":")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, int(port)), timeout=5).close()
        (tmp_path / "go").touch()
        returncode = terminal.finish(timeout=180)
    finally:
        terminal.kill()
    lines, last = render(terminal.output)
    assert returncode == 0, lines
    assert all(labelled(s) for s in terminal.screens), terminal.screens
    assert all(labelled(line) for line in lines + [last]), lines
    assert not [line for line in lines if FAILED_RPC.search(line)]
    # Worker 1's redrawn lines appear in their final state: one per epoch.
    assert len([line for line in lines if re.match(r"\[worker 1\] +\d+/12 ", line)]) == 2
    assert [line for line in lines if re.match(r"\[worker 1\] +\d+/12 ", line)][0].startswith(
        "[worker 1] 12/12"
    )
    reports = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in (0, 1)]
    assert reports[0]["final"] == reports[1]["final"]
    assert reports[0]["fda_logs"] == reports[1]["fda_logs"]


def test_successful_jobs_end_without_failed_rpcs(tmp_path):
    """Either worker may work on after training (worker 1 past its heartbeat period,
    worker 0 past the coordination service's 10 s heartbeat timeout); neither may
    leave the other an error behind: every worker waits for all, and worker 0,
    which hosts TF's coordination service, leaves last.

    Job A runs under the launcher and joins through connect(cluster_resolver=...);
    job B runs two workers by hand with TF_CONFIG in the shape that Kubeflow's
    TFJob operator writes (hosts by name, "environment": "cloud").
    """
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    linger = "11"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "200",
             str(FDA_FIT), "--out", str(a), "--resolver", "--linger_on", "1", "--linger", linger],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
    ]
    ports = launch_lib.free_ports(2)
    for index in (0, 1):
        env = launch_lib.worker_env(ports, index)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
             "task": {"type": "worker", "index": index}, "environment": "cloud"}
        )
        jobs.append(subprocess.Popen(
            [sys.executable, str(FDA_FIT), "--out", str(b), "--linger_on", "0", "--linger", linger],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        ))
    try:
        outputs = [job.communicate(timeout=240)[0] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
        assert not FAILED_RPC.search(output), output[-3000:]
    assert "[worker 0] worker 0 done" in outputs[0] and "[worker 1] worker 1 done" in outputs[0]
    for out in (a, b):
        reports = [json.loads((out / f"worker{i}.json").read_text()) for i in (0, 1)]
        assert [r["num_workers"] for r in reports] == [2, 2]
        assert reports[0]["final"] == reports[1]["final"]


def test_a_peer_behind_a_forwarder_whose_server_is_gone_counts_as_gone():
    """Worker 0 waits at exit while its peers' servers listen. A forwarder in front of a
    peer (a TCP proxy, the benchmark harness's relay) accepts and then closes when the
    server behind it is gone; counted as listening, it held worker 0 the whole
    EXIT_WAIT_SECONDS (45 s) at the end of every run on a link with a round trip."""
    from keras_fda.runtime import cluster as cluster_lib

    def server():
        listener = socket.create_server(("127.0.0.1", 0))
        return listener, f"127.0.0.1:{listener.getsockname()[1]}"

    live, live_address = server()
    forwarder, forwarder_address = server()
    closed, closed_address = server()
    closed.close()
    held = []
    try:
        # A server that takes the connection and waits for the client: listening.
        # listen() queues the connection, so it is accepted only afterwards.
        assert cluster_lib._listening(live_address)
        held.append(live.accept()[0])
        # A forwarder whose server is gone: it accepts, then closes at once.
        closer = threading.Thread(target=lambda: forwarder.accept()[0].close())
        closer.start()
        assert not cluster_lib._listening(forwarder_address)
        closer.join(TIMEOUT)
        # No server at all: the connection is refused.
        assert not cluster_lib._listening(closed_address)
    finally:
        for sock in (live, forwarder, *held):
            sock.close()


def test_an_unprivileged_launcher_uses_a_user_namespace_where_the_kernel_allows_one():
    """Without root, the launcher needs an unprivileged user namespace for its network
    namespace: where `unshare --user --net` works for the same user, the workers must
    get a private network; where it does not, the launcher must say so once."""
    with tempfile.TemporaryDirectory() as pids:  # pytest's own are closed to other users
        run_unprivileged(pathlib.Path(pids))


def run_unprivileged(pid_dir):
    command = [sys.executable, str(LAUNCH), "--workers", "2", str(WORKER), str(pid_dir), "0,0"]
    probe = ["unshare", "--user", "--net", "true"]
    if os.geteuid() == 0:
        # As nobody, with Debian's interpreter (the launcher and the stand-in worker
        # need only the standard library; this interpreter may live under /root).
        pid_dir.chmod(0o777)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        command = drop + ["/usr/bin/python3", *command[1:]]
        probe = drop + probe
    allowed = subprocess.run(probe, capture_output=True, timeout=TIMEOUT).returncode == 0
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd="/")
    assert result.returncode == 0, result
    namespaces = {r["netns"] for r in worker_reports(result.stdout).values()}
    assert len(namespaces) == 1
    if allowed:
        assert namespaces != {os.readlink("/proc/self/ns/net")}
        assert "private network namespace" not in result.stderr
    else:
        assert result.stderr.count("cannot run the workers in a private network namespace") == 1
