"""Data-parallel training on tf.distribute: which cluster this process is in, the strategy that
drives the compat.v1 graph across it, and the cross-replica means of the train step.

One process per worker (TF_CONFIG names them, or Slurm through `--cluster slurm`); each builds
the identical graph inside `Replication.scope()` (collective keys follow construction order)
and runs every train op, so the ring all-reduce of tf.compat.v1's MultiWorkerMirroredStrategy
meets in the middle. The gradients and the loss are averaged once per optimizer step, before
clipping (so clipping sees the global gradient), and the optimizer applies them with
skip_gradients_aggregation=True (else TF1's optimizer would SUM them once more across replicas).

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
    """The workers (host:port each, in TF_CONFIG's order) and this process's index among them.
    Worker 0 is the chief: it alone writes the run directory."""

    workers: tuple[str, ...]
    task: int

    @property
    def chief(self) -> bool:
        return self.task == 0

    @property
    def replicas(self) -> int:
        return len(self.workers)  # one device per worker (CPU, or one GPU each)

    def name(self, task: int) -> str:
        return f"worker {task} ({self.workers[task]})"


def parse_tf_config(text: str) -> Cluster | None:
    """The Cluster of a TF_CONFIG value, or None if it names a single worker."""
    try:
        spec = json.loads(text)
        workers = tuple(str(w) for w in spec["cluster"]["worker"])
        task = spec.get("task", {})
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"TF_CONFIG is not a cluster spec ({e!r}): give JSON like"
                        ' {"cluster": {"worker": ["host:port", ...]}, "task": {"type":'
                        ' "worker", "index": 0}}') from None
    extra = sorted(set(spec["cluster"]) - {"worker"})
    if extra or kind != "worker":
        raise UserError(f"TF_CONFIG: only 'worker' tasks are supported (worker 0 is the chief),"
                        f" got {extra or kind!r}")
    if not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG: task index {index} is not one of the {len(workers)} workers")
    return Cluster(workers, index) if len(workers) > 1 else None


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


def resolve(cluster: str, environ=None) -> Cluster | None:
    """The cluster this process trains in; None: train alone (the single-process path)."""
    environ = os.environ if environ is None else environ
    if cluster == "none":
        return None
    if cluster == "slurm":
        return parse_tf_config(slurm_tf_config())
    text = environ.get(TF_CONFIG, "")
    return parse_tf_config(text) if text.strip() else None


class Replication:
    """The strategy over a Cluster; create it inside the training graph (created eagerly, the
    strategy would start its own server), and build that whole graph inside `scope()` so every
    op lands on this worker."""

    def __init__(self, cluster: Cluster, *, timeout_s: float):
        import tensorflow as tf

        self.cluster, self.timeout_s = cluster, timeout_s
        self._tf = tf
        spec = tf.train.ClusterSpec({"worker": list(cluster.workers)})
        self.resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            spec, task_type="worker", task_id=cluster.task, rpc_layer="grpc")
        self.strategy = tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy(
            cluster_resolver=self.resolver)
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

    def build(self, fn):
        """fn() run as this worker's replica (its variables become mirrored); returns its
        result. Also builds the stop agreement."""
        built = []

        def replica():
            built.append(fn())
            tf1 = self._tf.compat.v1
            self._stop_flag = tf1.placeholder_with_default(0.0, [], name="stop_flag")
            (mean,) = self.mean([self._stop_flag])
            self._stop_any = mean > 0.0  # any worker asked: the mean of 0/1 flags is > 0

        self.strategy.extended.call_for_each_replica(replica)
        return built[0]

    def mean(self, tensors: list) -> list:
        """The mean of each tensor over the replicas (call in a replica context): one batched
        all-reduce with the collective deadline."""
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
        """A Session on this worker's server (started here, on its TF_CONFIG port)."""
        tf = self._tf
        config = self.strategy.update_config_proto(config)
        self.server = tf.distribute.Server(
            self.resolver.cluster_spec(), job_name="worker", task_index=self.cluster.task,
            config=config, protocol="grpc", start=True)
        return tf.compat.v1.Session(self.server.target, graph=graph, config=config)

    def agree_stop(self, session, asked: bool) -> bool:
        """Whether any worker asked to stop (every worker calls this once per step)."""
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
