"""Where `keras_fda.connect()` finds its cluster: TF_CONFIG, SLURM, Kubernetes, any ClusterResolver.

The SLURM layouts are checked here against the environment `srun` sets (the
variables as SLURM 22.05 writes them); tests/test_slurm.py runs a real step.
"""

import json
import pathlib
import re

import pytest
import tensorflow as tf

import keras_fda
from keras_fda.runtime import cluster as cluster_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hostnames(table):
    """A stand-in for `scontrol show hostnames`."""
    return lambda nodelist: table[nodelist]


def step(procid, ntasks, nodelist="vm", tasks_per_node=None, **more):
    """The variables `srun -n NTASKS` sets for task PROCID (and the job's)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": str(procid),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node or str(ntasks),
    }
    env.update(more)
    return env


def test_a_slurm_step_on_one_node_uses_the_reserved_ports():
    env = step(1, 2, SLURM_STEP_RESV_PORTS="30001-30003")
    assert cluster_lib.slurm_cluster(env, hostnames({"vm": ["vm"]})) == (
        ["vm:30001", "vm:30002"], 1
    )


def test_without_reserved_ports_slurm_tasks_use_the_documented_base_port():
    env = step(0, 2)
    base = cluster_lib.SLURM_PORT_BASE + cluster_lib.SLURM_PORTS_PER_JOB * (4242 % 1000)
    assert base == 12000 + 16 * 242
    workers, index = cluster_lib.slurm_cluster(env, hostnames({"vm": ["vm"]}))
    assert (workers, index) == ([f"vm:{base}", f"vm:{base + 1}"], 0)


@pytest.mark.parametrize(
    "distribution, expected",
    [
        # 5 tasks on nodes a, b, c with 2, 2, 1 tasks.
        (None, ["a:100", "a:101", "b:100", "b:101", "c:100"]),
        ("block", ["a:100", "a:101", "b:100", "b:101", "c:100"]),
        ("cyclic:block", ["a:100", "b:100", "c:100", "a:101", "b:101"]),
        # "*" is SLURM's default (block) in any field; only the first places on nodes.
        ("*", ["a:100", "a:101", "b:100", "b:101", "c:100"]),
        ("*:cyclic", ["a:100", "a:101", "b:100", "b:101", "c:100"]),
        ("*:*:*,Pack", ["a:100", "a:101", "b:100", "b:101", "c:100"]),
        ("cyclic:*", ["a:100", "b:100", "c:100", "a:101", "b:101"]),
        ("cyclic,NoPack", ["a:100", "b:100", "c:100", "a:101", "b:101"]),
    ],
)
def test_tasks_are_placed_on_nodes_as_slurm_places_them(distribution, expected):
    more = {"SLURM_STEP_RESV_PORTS": "100,101"}
    if distribution:
        more["SLURM_DISTRIBUTION"] = distribution
    env = step(3, 5, "n[a-c]", "2(x2),1", **more)
    workers, index = cluster_lib.slurm_cluster(env, hostnames({"n[a-c]": ["a", "b", "c"]}))
    assert (workers, index) == (expected, 3)


def test_sixteen_tasks_per_node_fit_the_ports_of_a_job_without_reserved_ports():
    base = cluster_lib.SLURM_PORT_BASE + cluster_lib.SLURM_PORTS_PER_JOB * 242
    workers, _ = cluster_lib.slurm_cluster(step(0, 16), hostnames({"vm": ["vm"]}))
    assert workers == [f"vm:{base + i}" for i in range(16)]
    # The next job's range begins where this one ends.
    assert base + 16 == cluster_lib.SLURM_PORT_BASE + cluster_lib.SLURM_PORTS_PER_JOB * 243


def test_more_tasks_per_node_than_a_job_has_ports_is_a_clear_error():
    """Issue 21: task 17 on a node silently took the port of the job whose ID is one higher."""
    with pytest.raises(ValueError, match=r"17 tasks of this SLURM step share a node, but "
                       r"without reserved ports keras_fda gives each job 16 ports per node.*"
                       r"srun --resv-ports=17"):
        cluster_lib.slurm_cluster(step(0, 17), hostnames({"vm": ["vm"]}))
    # 17 tasks on two nodes (9 + 8) fit; reserved ports lift the limit.
    env = step(16, 17, "n[1-2]", "9,8")
    workers, index = cluster_lib.slurm_cluster(env, hostnames({"n[1-2]": ["n1", "n2"]}))
    assert index == 16 and len(set(workers)) == 17
    env = step(16, 17, SLURM_STEP_RESV_PORTS="30000-30016")
    workers, _ = cluster_lib.slurm_cluster(env, hostnames({"vm": ["vm"]}))
    assert workers == [f"vm:{30000 + i}" for i in range(17)]


def test_an_sbatch_script_outside_srun_is_not_a_step():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert cluster_lib.slurm_cluster(env) is None


@pytest.mark.parametrize(
    "env, message",
    [
        (step(2, 2), r"SLURM_PROCID=2 is not a task of this step of 2 tasks"),
        (step("x", 2), r"SLURM_PROCID='x' is not an integer"),
        ({**step(0, 2), "SLURM_STEP_NUM_TASKS": "", "SLURM_NTASKS": ""},
         r"SLURM_STEP_NUM_TASKS='' is not an integer"),
        (step(0, 3, tasks_per_node="2"), r"does not lay out 3 tasks on the 1 nodes"),
        (step(0, 2, tasks_per_node="two"), r"is not of the form '2\(x3\),1'"),
        (step(0, 2, SLURM_STEP_RESV_PORTS="30001"), r"has 1 ports, but 2 tasks share a node"),
        (step(0, 2, SLURM_STEP_RESV_PORTS="a-b"), r"is not of the form"),
        (step(0, 2, SLURM_DISTRIBUTION="plane=2"), r"only block and cyclic"),
        ({k: v for k, v in step(0, 2).items() if k != "SLURM_JOB_ID"},
         r"SLURM_JOB_ID is not set"),
    ],
)
def test_a_bad_slurm_environment_is_a_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        cluster_lib.slurm_cluster(env, hostnames({"vm": ["vm"]}))


def test_without_scontrol_a_slurm_step_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="scontrol is not on PATH"):
        cluster_lib.slurm_cluster(step(0, 2))


@pytest.fixture
def environment(monkeypatch):
    """A clean slate: nothing connected, no TF_CONFIG, no SLURM variables."""
    monkeypatch.setattr(cluster_lib, "_current", None)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name in list(step(0, 1)) + ["SLURM_STEP_RESV_PORTS", "SLURM_DISTRIBUTION"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cluster_lib, "_scontrol_hostnames", hostnames({"vm": ["vm"]}))
    return monkeypatch


def test_tf_config_wins_over_slurm(environment):
    for name, value in step(1, 2, SLURM_STEP_RESV_PORTS="30001-30002").items():
        environment.setenv(name, value)
    assert cluster_lib._cluster_from_environment()[:2] == (["vm:30001", "vm:30002"], 1)
    environment.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["h:1", "h:2", "h:3"]},
                    "task": {"type": "worker", "index": 2}}),
    )
    assert cluster_lib._cluster_from_environment()[:2] == (["h:1", "h:2", "h:3"], 2)


def test_a_slurm_step_without_connect_refuses_to_train_alone(environment):
    for name, value in step(0, 2).items():
        environment.setenv(name, value)
    with pytest.raises(RuntimeError, match="keras_fda.connect\\(\\) was not called"):
        keras_fda.FDACallback(threshold=1.0).cluster


def test_a_one_task_slurm_step_is_one_local_worker(environment):
    for name, value in step(0, 1).items():
        environment.setenv(name, value)
    cluster = keras_fda.connect()
    assert (cluster.num_workers, cluster.worker_index) == (1, 0)


def resolver(jobs, task_type="worker", task_id=0):
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task_type, task_id=task_id
    )


@pytest.mark.parametrize(
    "jobs, task_type, task_id, message",
    [
        ({"worker": ["a:1", "b:2"], "ps": ["c:3"]}, "worker", 0, r"jobs \['ps'\]"),
        ({"worker": {0: "a:1", 2: "b:2"}}, "worker", 0, "densely"),
        ({"worker": ["a:1", "b:2"]}, "chief", 0, "task_type must be 'worker'"),
        ({"worker": ["a:1", "b:2"]}, "worker", 2, r"task_id must be an integer in \[0, 2\)"),
    ],
)
def test_a_cluster_resolver_must_describe_workers_only(
    environment, jobs, task_type, task_id, message
):
    with pytest.raises(ValueError, match=message):
        keras_fda.connect(cluster_resolver=resolver(jobs, task_type, task_id))


def test_connect_takes_only_cluster_resolvers(environment):
    with pytest.raises(TypeError, match="must be a tf.distribute.cluster_resolver.ClusterResolver"):
        keras_fda.connect(cluster_resolver={"worker": ["a:1"]})


def test_a_cluster_resolver_of_one_worker_is_one_local_worker(environment):
    cluster = keras_fda.connect(cluster_resolver=resolver({"worker": ["localhost:1"]}))
    assert (cluster.num_workers, cluster.strategy) == (1, None)


# --- Kubernetes: Kubeflow's TFJob operator ---


def tfjob_tf_config(manifest, namespace, index):
    """TF_CONFIG as Kubeflow's training operator writes it for worker replica `index`.

    Its documented shape: every replica's address through the job's headless
    services, `<job>-worker-<i>.<namespace>.svc:<tfjob-port>`, this replica's
    task, and `"environment": "cloud"`.
    """
    name = re.search(r"^metadata:\n  name: (\S+)", manifest, re.M).group(1)
    replicas = int(re.search(r"Worker:\n\s+replicas: (\d+)", manifest).group(1))
    port = int(re.search(r"name: tfjob-port[^\n]*\n\s+containerPort: (\d+)", manifest).group(1))
    workers = [f"{name}-worker-{i}.{namespace}.svc:{port}" for i in range(replicas)]
    return json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index},
         "environment": "cloud"}
    )


def test_the_tfjob_operators_tf_config_is_accepted_by_connect():
    manifest = (ROOT / "examples" / "k8s" / "tfjob.yaml").read_text()
    assert "kind: TFJob" in manifest and "Chief:" not in manifest and "PS:" not in manifest
    for index in range(4):
        workers, got = cluster_lib.parse_tf_config(tfjob_tf_config(manifest, "team-a", index))
        assert got == index
        assert workers[index] == f"keras-fda-quickstart-worker-{index}.team-a.svc:2222"


# --- What a PeerFailureError quotes ---


def test_the_cause_of_a_graph_execution_error_is_its_own_line():
    @tf.function
    def failing(x):
        return tf.debugging.check_numerics(x, "the other worker is gone")

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        failing(tf.constant([float("nan")]))
    assert raised.value.message.startswith("Graph execution error:")
    assert cluster_lib.error_cause(raised.value) == (
        "the other worker is gone : Tensor had NaN values"
    )


def test_the_cause_of_an_eager_error_is_its_first_line():
    error = tf.errors.UnavailableError(
        None, None, "Collective ops is aborted by: connection reset\nThe error could be ..."
    )
    assert cluster_lib.error_cause(error) == "Collective ops is aborted by: connection reset"
