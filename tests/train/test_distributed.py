"""Data-parallel training: 2 worker processes on 127.0.0.1 (CPU) against one process.

The workers are train.py subprocesses given TF_CONFIG; the single-process runs train in-process
with TF_CONFIG removed, so the tests do not depend on the environment they start in.
"""

import os
import signal
import socket
import time

import numpy as np
import pytest
from train_helpers import Child, base_args, latest_name, losses, make_models_dir, train

from gpt2tf.errors import UserError
from gpt2tf.train import distributed


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


@pytest.fixture(autouse=True)
def alone(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tf_config(ports: list[int], index: int) -> str:
    workers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    return f'{{"cluster": {{"worker": [{workers}]}}, "task": {{"type": "worker", "index": {index}}}}}'


def _workers(args: list, n: int = 2) -> list[Child]:
    ports = _free_ports(n)
    return [Child(args, env={"TF_CONFIG": _tf_config(ports, i)}) for i in range(n)]


def _args(tmp, models, data, run_name, **flags):
    flags = {"seq_len": 16, "learning_rate": 1e-3, "max_grad_norm": 0.5, **flags}
    return base_args(tmp, models, data, run_name, **flags)


def _weights(prefix) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def _assert_same_weights(a, b, atol=1e-5):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)  # OpenAI's names and Adam's slots, nothing else
    worst = max(float(np.max(np.abs(wa[n] - wb[n]))) for n in wa)
    assert worst <= atol, worst


@pytest.fixture
def data(tmp_path):
    from train_helpers import write_text_data

    return write_text_data(tmp_path / "data.txt")


def test_two_workers_equal_one_process_at_the_global_batch_and_resume_on_one(
        tmp_path, models_dir, data, capsys):
    """2 workers x batch 1 = 1 process x batch 2 (Adam, clipping active), and the run they
    started continues on one process at batch 2 as if it had never stopped."""
    kids = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1, steps=2))
    code, _, err = train(_args(tmp_path, models_dir, data, "alone", batch_size=2, steps=4,
                               save_every=2, max_checkpoints=0), capsys)
    assert code == 0, err
    results = [k.finish(timeout=180) for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert any("global batch 2 (2 x --batch_size 1)" in line for line in kids[0].lines)
    ck = tmp_path / "checkpoint"
    _assert_same_weights(ck / "dist" / "model-2", ck / "alone" / "model-2")
    alone, dist = losses(ck / "alone"), losses(ck / "dist")
    assert sorted(dist) == [1, 2]  # one metrics.jsonl, the chief's: global mean losses
    for step in dist:
        assert dist[step] == pytest.approx(alone[step], abs=1e-6)

    # Topology-free: the same run resumes on one process at the same global batch.
    code, _, err = train(_args(tmp_path, models_dir, data, "dist", batch_size=2, steps=2),
                         capsys)
    assert code == 0, err
    _assert_same_weights(ck / "dist" / "model-4", ck / "alone" / "model-4")
    resumed = losses(ck / "dist")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(alone[step], abs=1e-6)


def test_one_process_resumes_on_two_workers_with_accumulation(tmp_path, models_dir, data,
                                                              capsys):
    """A run started alone at batch 2 continues on 2 workers x batch 1 (2 micro-batches a
    step) as an uninterrupted run does."""
    ck = tmp_path / "checkpoint"
    for run, steps in (("dist", 1), ("alone", 2)):
        code, _, err = train(_args(tmp_path, models_dir, data, run, batch_size=2, steps=steps,
                                   accumulate_gradients=2), capsys)
        assert code == 0, err
    kids = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1, steps=1,
                          accumulate_gradients=2))
    results = [k.finish(timeout=180) for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    _assert_same_weights(ck / "dist" / "model-2", ck / "alone" / "model-2")
    alone, dist = losses(ck / "alone"), losses(ck / "dist")
    assert sorted(dist) == [1, 2]
    for step in (1, 2):
        assert dist[step] == pytest.approx(alone[step], abs=1e-6)


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


def test_a_killed_worker_ends_the_other_with_an_error_naming_it(tmp_path, models_dir, data):
    chief, worker = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1,
                                   steps=-1, save_every=2, collective_timeout_s=5))
    chief.wait_for("[5 |")
    os.kill(worker.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    code, _, err = chief.finish(timeout=60)
    assert code == 1
    assert time.monotonic() - killed_at < 30  # the 5 s deadline, not a hang
    (line,) = _error_lines(err)
    assert "worker 1 (127.0.0.1:" in line and "--restore_from latest" in line
    worker.finish()
    run = tmp_path / "checkpoint" / "dist"
    latest = run / latest_name(run)
    weights = _weights(latest)  # complete: every tensor reads back
    assert "model/wte" in weights and int(latest.name.split("-")[1]) >= 4


def test_sigterm_on_one_worker_stops_the_group_and_the_chief_saves_once(
        tmp_path, models_dir, data):
    chief, worker = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1,
                                   steps=-1, save_every=0, sample_every=2, sample_num=1,
                                   sample_length=4))
    worker.wait_for("[3 |")
    os.kill(worker.proc.pid, signal.SIGTERM)
    (c_code, _, c_err), (w_code, _, w_err) = chief.finish(), worker.finish()
    assert (c_code, w_code) == (0, 0), (c_err[-2000:], w_err[-2000:])
    saves = [x for x in chief.lines if x.startswith("Saving")]
    assert len(saves) == 1
    assert not any(x.startswith("Saving") for x in worker.lines)
    run = tmp_path / "checkpoint" / "dist"
    last = max(losses(run))
    assert latest_name(run) == f"model-{last}"  # the step the group stopped after
    # The chief samples (the sampler's cache is its own, not mirrored); the worker does not.
    assert (tmp_path / "samples" / "dist" / "samples-2").is_file()
    assert sum("SAMPLE 1" in x for x in chief.lines) >= 1
    assert not any("SAMPLE 1" in x for x in worker.lines)


def test_tf_config_parsing():
    workers = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    assert distributed.parse_tf_config(workers) == distributed.Cluster(("a:1", "b:2"), 1)
    one = '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    assert distributed.parse_tf_config(one) is None  # one worker trains alone
    assert distributed.resolve("none", {"TF_CONFIG": workers}) is None
    assert distributed.resolve("auto", {}) is None
    for bad in ("{", '{"cluster": {}}', workers.replace('"index": 1', '"index": 2'),
                workers.replace('"worker", "index"', '"ps", "index"')):
        with pytest.raises(UserError, match="TF_CONFIG"):
            distributed.parse_tf_config(bad)


def test_bad_tf_config_is_a_one_line_error(tmp_path, models_dir, data, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "not json")
    code, _, err = train(_args(tmp_path, models_dir, data, "bad", steps=1), capsys)
    assert code == 1
    assert err.startswith("error: TF_CONFIG is not a cluster spec") and "Traceback" not in err
    code, _, err = train(_args(tmp_path, models_dir, data, "bad", steps=1,
                               cluster="mesh"), capsys)
    assert code == 1 and "cluster must be one of auto, slurm, none" in err
    assert not (tmp_path / "checkpoint" / "bad").exists()


def test_cluster_slurm_reads_the_allocation(monkeypatch):
    """Four tasks on two nodes (faked SLURM_* of `srun -N2 --ntasks-per-node 2`)."""
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    with pytest.raises(UserError, match="no Slurm allocation"):
        distributed.resolve("slurm")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[07-08]")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    import json

    config = json.loads(distributed.slurm_tf_config())
    assert config == {"cluster": {"worker": ["node07:8888", "node07:8889", "node08:8888",
                                             "node08:8889"]},
                      "task": {"type": "worker", "index": 2}}
    assert distributed.resolve("slurm") == distributed.Cluster(
        ("node07:8888", "node07:8889", "node08:8888", "node08:8889"), 2)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # devices left as Slurm set them
