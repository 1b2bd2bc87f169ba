"""Data-parallel training on tf.distribute: where this process's replicas are, the strategy that
drives the compat.v1 graph across them, and the cross-replica means of the train step.

One process per worker (TF_CONFIG names them, or Slurm through `--cluster slurm`); each builds
the identical graph inside `Replication.scope()` (collective keys follow construction order)
and runs every train op, so the ring all-reduce of tf.compat.v1's MultiWorkerMirroredStrategy
meets in the middle. One process alone with several local devices (`--devices`) trains one
replica on each with tf.compat.v1's MirroredStrategy (NCCL between GPUs). The gradients and the
loss are averaged once per optimizer step, before clipping (so clipping sees the global
gradient), and the optimizer applies them with skip_gradients_aggregation=True (else TF1's
optimizer would SUM them once more across replicas).

Every collective has a deadline (`--collective_timeout_s`): a worker that dies leaves the
others with an error that names it instead of a hang. A stop asked on any worker (Ctrl-C,
SIGTERM) is agreed by all before the next step (`Replication.agree_stop`).
"""

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

from gpt2tf import settings
from gpt2tf.errors import UserError

TF_CONFIG = "TF_CONFIG"
CLUSTERS = settings.CLUSTERS  # auto: TF_CONFIG if it names several workers
SLURM_PORT = 8888  # the first port SlurmClusterResolver gives a task on its node


@dataclass(frozen=True)
class Cluster:
    """Where this process's replicas are: the workers (host:port each, the chief first) and this
    process's index among them, and the local devices it trains on, one replica each. Worker 0
    is the chief: it alone writes the run directory."""

    workers: tuple[str, ...] = ()  # (): this process trains alone
    task: int = 0
    devices: tuple[str, ...] = ()  # (): one replica on the default device
    labels: tuple[str, ...] = ()  # TF_CONFIG's names of the workers, where it has a chief

    @property
    def chief(self) -> bool:
        return self.task == 0

    @property
    def multi_worker(self) -> bool:
        return len(self.workers) > 1

    @property
    def local_replicas(self) -> int:
        return max(1, len(self.devices))

    @property
    def replicas(self) -> int:
        return max(1, len(self.workers)) * self.local_replicas

    def name(self, task: int) -> str:
        label = self.labels[task] if self.labels else f"worker {task}"
        return f"{label} ({self.workers[task]})"

    def describe(self) -> str:
        if self.multi_worker:
            return f"{self.name(self.task)} of {len(self.workers)}"
        return f"on {len(self.devices)} devices ({', '.join(self.devices)})"


def parse_tf_config(text: str) -> Cluster | None:
    """The Cluster of a TF_CONFIG value, or None if it names a single worker. A "chief" task
    (Kubeflow's TFJob, Ray Train) is worker 0 and the "worker" tasks follow it."""
    try:
        spec = json.loads(text)
        jobs = {str(k): [str(w) for w in v] for k, v in spec["cluster"].items()}
        task = spec.get("task", {})
        kind, index = str(task.get("type", "worker")), int(task.get("index", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"TF_CONFIG is not a cluster spec ({e!r}): give JSON like"
                        ' {"cluster": {"worker": ["host:port", ...]}, "task": {"type":'
                        ' "worker", "index": 0}}') from None
    other = sorted(set(jobs) - {"chief", "worker"} | ({kind} - {"chief", "worker"}))
    if other:
        raise UserError(f"TF_CONFIG names {', '.join(map(repr, other))} tasks:"
                        " ParameterServerStrategy is not supported; data-parallel training"
                        " takes 'worker' tasks (and at most one 'chief', which is worker 0)")
    chief, workers = jobs.get("chief", []), jobs.get("worker", [])
    if len(chief) > 1 or not chief + workers:
        raise UserError(f"TF_CONFIG: give one or more 'worker' tasks and at most one 'chief',"
                        f" got {len(chief)} chief and {len(workers)} worker tasks")
    if not 0 <= index < len(jobs.get(kind, [])):
        raise UserError(f"TF_CONFIG: task index {index} is not one of the"
                        f" {len(jobs.get(kind, []))} {kind} tasks")
    everyone = tuple(chief + workers)
    labels = ("chief", *(f"worker {i}" for i in range(len(workers)))) if chief else ()
    if len(everyone) == 1:
        return None
    return Cluster(everyone, index + len(chief) * (kind == "worker"), labels=labels)


def local_devices(count: int, *, in_cluster: bool = False) -> tuple[str, ...]:
    """The devices of --devices `count` (one replica each; () for one replica on the default
    device): 0 every local GPU where there are several; N the first N GPUs, or N logical CPU
    devices where there is no GPU (they share the cores: a way to test on a laptop)."""
    if count == 1:
        return ()
    if in_cluster and count > 1:
        raise UserError(f"--devices {count}: each worker of a cluster trains on one device;"
                        " start one worker per GPU instead (CUDA_VISIBLE_DEVICES)")
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    if count == 0:
        return tuple(f"/gpu:{i}" for i in range(gpus)) if gpus > 1 and not in_cluster else ()
    if gpus and count > gpus:
        raise UserError(f"--devices {count}: this machine has {gpus} GPU(s)")
    kind = "gpu" if gpus else "cpu"
    return tuple(f"/{kind}:{i}" for i in range(count))


def slurm_tf_config(port_base: int = SLURM_PORT) -> str:
    """TF_CONFIG for this Slurm task, from SLURM_* variables (TF's SlurmClusterResolver)."""
    import tensorflow as tf

    try:
        # Every task of the step is a worker; devices stay as Slurm gave them. The resolver
        # places at most gpus_per_node / gpus_per_task tasks on a node: a count no node
        # reaches keeps it from dropping tasks (auto_set_gpu off: nothing is set from it).
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=1 << 16, gpus_per_task=1, auto_set_gpu=False)
        spec = resolver.cluster_spec().as_dict()
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--cluster slurm: no Slurm allocation to read ({e!r}); run under srun"
                        " or sbatch") from None
    return json.dumps({"cluster": spec, "task": {"type": resolver.task_type,
                                                  "index": resolver.task_id}})


def resolve(cluster: str, environ=None, *, devices: int = 0) -> Cluster | None:
    """Where this process trains; None: alone on one device (the single-process path)."""
    environ = os.environ if environ is None else environ
    if cluster == "slurm":
        workers = parse_tf_config(slurm_tf_config())
    else:
        text = environ.get(TF_CONFIG, "") if cluster == "auto" else ""
        workers = parse_tf_config(text) if text.strip() else None
    local = local_devices(devices, in_cluster=workers is not None)
    if workers is not None:
        return workers
    return Cluster(devices=local) if local else None


class Replication:
    """The strategy over a Cluster; create it inside the training graph (created eagerly, the
    strategy would start its own server), and build that whole graph inside `scope()` so every
    op lands on this worker's devices."""

    def __init__(self, cluster: Cluster, *, timeout_s: float):
        import tensorflow as tf

        self.cluster, self.timeout_s = cluster, timeout_s
        self._tf = tf
        self.resolver = None
        if cluster.multi_worker:
            spec = tf.train.ClusterSpec({"worker": list(cluster.workers)})
            self.resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                spec, task_type="worker", task_id=cluster.task, rpc_layer="grpc")
            self.strategy = tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy(
                cluster_resolver=self.resolver)
        else:
            # GPUs: the strategy picks NCCL. Logical CPU devices: a sum on the first device
            # (the default would pick it too, after a warning that it cannot see them yet).
            cpus = all(d.startswith("/cpu:") for d in cluster.devices)
            self.strategy = tf.compat.v1.distribute.MirroredStrategy(
                devices=list(cluster.devices),
                cross_device_ops=tf.distribute.ReductionToOneDevice() if cpus else None)
        self.options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=timeout_s)
        self._stop_flag = self._stop_any = None

    @contextmanager
    def scope(self):
        with self.strategy.scope():
            yield

    @contextmanager
    def local_variables(self):
        """Variables created here stay this worker's own, not mirrored (no broadcast at init):
        the sampler's key/value cache takes scatter writes, which mirrored variables refuse."""
        # SingleDevice is how the strategy itself places a variable outside the mirror.
        from tensorflow.python.distribute.numpy_dataset import SingleDevice

        device = SingleDevice(self.strategy.extended.worker_devices[0])

        def creator(next_creator, **kwargs):
            return next_creator(**{**kwargs, "colocate_with": device})

        with self._tf.variable_creator_scope(creator):
            yield

    def build(self, fn, *inputs) -> list:
        """fn(*rows) run as each local replica, where rows are that replica's rows of each input
        ([local_replicas * B, ...] -> [B, ...]); the replicas' results, in order. Variables
        made in fn become mirrored. Across workers, also builds the stop agreement."""
        tf, n = self._tf, self.cluster.local_replicas
        built = {}

        def replica():
            # This replica's index among this process's (its id counts every worker's) and its
            # rows, sliced on its own device.
            ctx = tf.distribute.get_replica_context()
            i = int(tf.get_static_value(ctx.replica_id_in_sync_group)) % n
            rows = [x[i * (x.shape[0] // n):(i + 1) * (x.shape[0] // n)] if n > 1 else x
                    for x in inputs]
            built[i] = fn(*rows)
            if self.cluster.multi_worker:
                self._stop_flag = tf.compat.v1.placeholder_with_default(0.0, [],
                                                                        name="stop_flag")
                (mean,) = self.mean([self._stop_flag])
                self._stop_any = mean > 0.0  # any worker asked: the mean of 0/1 flags is > 0

        self.strategy.extended.call_for_each_replica(replica)
        return [built[i] for i in range(n)]

    def mean(self, tensors: list) -> list:
        """The mean of each tensor over the replicas (call in a replica context): one batched
        all-reduce with the collective deadline. (ReplicaContext.all_reduce fails in graph
        mode with several local replicas: merge_call + batch_reduce_to does not.)"""
        mean = self._tf.distribute.ReduceOp.MEAN

        def reduce(strategy, *xs):
            return strategy.extended.batch_reduce_to(
                mean, [(x, x) for x in xs], options=self.options)

        ctx = self._tf.distribute.get_replica_context()
        out = ctx.merge_call(reduce, args=tuple(tensors))
        # Cross-replica results come back as per-replica values; this replica's is its own.
        return [ctx.strategy.experimental_local_results(x)[0] if hasattr(x, "values") else x
                for x in out]

    def session(self, graph, config):
        """A Session on this worker's server (started here, on its TF_CONFIG port), or, alone,
        a local one (with as many CPU devices as the replicas use)."""
        tf = self._tf
        config = self.strategy.update_config_proto(config)
        if not self.cluster.multi_worker:
            cpus = sum(d.startswith("/cpu:") for d in self.cluster.devices)
            if cpus:
                config.device_count["CPU"] = cpus
            return tf.compat.v1.Session(graph=graph, config=config)
        self.server = tf.distribute.Server(
            self.resolver.cluster_spec(), job_name="worker", task_index=self.cluster.task,
            config=config, protocol="grpc", start=True)
        return tf.compat.v1.Session(self.server.target, graph=graph, config=config)

    def agree_stop(self, session, asked: bool) -> bool:
        """Whether any worker asked to stop (every worker calls this once per step)."""
        if not self.cluster.multi_worker:
            return asked
        return bool(session.run(self._stop_any, {self._stop_flag: 1.0 if asked else 0.0}))

    def lost_worker(self, error, *, latest: str) -> UserError:
        """The one-line error of a collective that failed: a worker died or stopped answering."""
        tasks = {int(t) for t in re.findall(r"/task:(\d+)", str(error.message))}
        lost = sorted(tasks - {self.cluster.task}) or [
            t for t in range(self.cluster.replicas) if t != self.cluster.task]
        who = ", ".join(self.cluster.name(t) for t in lost)
        kind = type(error).__name__
        return UserError(
            f"lost contact with {who}: a collective failed ({kind}) within"
            f" --collective_timeout_s {self.timeout_s:g}; the latest checkpoint {latest} is"
            " intact: restart every worker with --restore_from latest")


@contextmanager
def replicated(cluster: Cluster | None, *, timeout_s: float):
    """Inside the graph being built: its Replication with the strategy's scope entered, or None
    (and nothing changes) without a cluster."""
    if cluster is None:
        yield None
        return
    replication = Replication(cluster, timeout_s=timeout_s)
    with replication.scope():
        yield replication
