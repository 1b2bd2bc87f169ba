"""Data-parallel training: 2 worker processes on 127.0.0.1 (CPU), or one process on 2 logical
CPU devices, against one process.

The workers are train.py subprocesses given TF_CONFIG; the single-process runs train in-process
with TF_CONFIG removed, so the tests do not depend on the environment they start in.
"""

import dataclasses
import json
import os
import signal
import time

import numpy as np
import pytest
from train_helpers import (Child, base_args, latest_name, losses, make_models_dir,
                           start_workers, tf_config, train)

from gpt2tf.errors import UserError
from gpt2tf.train import distributed


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


@pytest.fixture(autouse=True)
def alone(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)


def _chief_tf_config(ports: list[int], index: int) -> str:
    """Kubeflow's TFJob and Ray Train's layout: a "chief" task, then the "worker" tasks."""
    chief, *workers = [f"127.0.0.1:{p}" for p in ports]
    task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    return json.dumps({"cluster": {"chief": [chief], "worker": workers}, "task": task})


def _workers(args: list, n: int = 2, *, layout=tf_config) -> list[Child]:
    return start_workers(args, n, layout=layout)


def _args(tmp, models, data, run_name, **flags):
    flags = {"seq_len": 16, "learning_rate": 1e-3, "max_grad_norm": 0.5, **flags}
    return base_args(tmp, models, data, run_name, **flags)


def _weights(prefix) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def _assert_same_weights(a, b, atol=1e-5, *, skip=()):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)  # OpenAI's names and the optimizer's slots, nothing else
    worst = max((float(np.max(np.abs(wa[n] - wb[n]))), n) for n in wa
                if not n.endswith(tuple(skip)))
    assert worst[0] <= atol, worst


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


# (id, flags, what is skipped in the weights, loss tolerance)
CONFIGS = [
    # fp32: as exact as Adam's runs above. Adafactor's updates are g / rms(g) with an epsilon
    # of 1e-30: c_attn/b's key third has a gradient that is 0 in exact arithmetic (softmax
    # ignores a bias added to every key's score), so its computed gradient is rounding noise,
    # which Adafactor turns into full +-lr steps, and the update clipping's RMS spreads that to
    # the whole of c_attn/b. One process at batch 1 x 2 micro-batches differs from batch 2
    # there just as much (5e-3 after 3 steps): that is Adafactor's arithmetic, not the
    # topology's. Every other weight stays within 1e-5 and the losses within 1e-6.
    pytest.param({"optimizer": "adafactor", "memory_saving_gradients": True}, ("c_attn/b",),
                 1e-6, id="adafactor-recompute"),
    # bf16 rounds each matmul's output to 8 significant bits: one row per worker rounds other
    # partial sums than two rows in one matmul, and a weight that moves by 1e-7 flips some
    # roundings in the next forward pass. SGD keeps the weights within 1e-5 (2.4e-7 measured);
    # the losses move by up to ~1e-4 (2e-5 of a loss of 5.5, far below bf16's 2^-8 = 3.9e-3).
    pytest.param({"optimizer": "sgd", "precision": "bf16"}, (), 1e-3, id="sgd-bf16"),
]


@pytest.mark.parametrize("flags,skip,loss_tol", CONFIGS)
def test_two_workers_equal_one_process_with(flags, skip, loss_tol, tmp_path, models_dir, data,
                                            capsys):
    """2 workers x batch 1 = 1 process x batch 2 for the other optimizers, memory-saving
    gradients and bf16 (Adam, clipping and accumulation: the tests above)."""
    kids = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1, steps=2, **flags))
    code, _, err = train(_args(tmp_path, models_dir, data, "alone", batch_size=2, steps=2,
                               **flags), capsys)
    assert code == 0, err
    results = [k.finish(timeout=180) for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    ck = tmp_path / "checkpoint"
    _assert_same_weights(ck / "dist" / "model-2", ck / "alone" / "model-2", skip=skip)
    alone, dist = losses(ck / "alone"), losses(ck / "dist")
    assert sorted(dist) == [1, 2]
    for step in dist:
        assert dist[step] == pytest.approx(alone[step], abs=loss_tol)


def test_two_local_devices_equal_one_process_at_the_global_batch(tmp_path, models_dir, data,
                                                                 capsys):
    """One process x 2 logical CPU devices x batch 1 (MirroredStrategy) = 1 process x batch 2:
    Adam, clipping, 2 micro-batches a step; the checkpoint's names are a single run's; the
    periodic sample reads the mirrored weights."""
    ck, said = tmp_path / "checkpoint", {}
    mirrored = {"batch_size": 1, "devices": 2, "sample_every": 3, "sample_length": 4}
    for run, flags in (("mirrored", mirrored), ("alone", {"batch_size": 2})):
        code, said[run], err = train(_args(tmp_path, models_dir, data, run, steps=3,
                                           accumulate_gradients=2, **flags), capsys)
        assert code == 0, err
    assert ("Training on 2 devices (/cpu:0, /cpu:1): global batch 2 (2 x --batch_size 1)"
            in said["mirrored"])
    assert "======== SAMPLE 1 ========" in said["mirrored"]
    _assert_same_weights(ck / "mirrored" / "model-3", ck / "alone" / "model-3")
    alone, mirrored = losses(ck / "alone"), losses(ck / "mirrored")
    assert sorted(mirrored) == [1, 2, 3]
    for step in mirrored:
        assert mirrored[step] == pytest.approx(alone[step], abs=1e-6)


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


def _kill_one(chief: Child, victim: Child, *, survivor: Child) -> str:
    """kill -9 `victim` once the chief is at step 5: `survivor` exits 1 within the 5 s
    collective deadline (never a hang) with one error line, returned."""
    chief.wait_for("[5 |")
    os.kill(victim.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    code, _, err = survivor.finish(timeout=60)
    assert code == 1, err[-2000:]
    assert time.monotonic() - killed_at < 30  # the 5 s deadline, not a hang
    (line,) = _error_lines(err)
    return line


def test_a_killed_worker_ends_the_other_with_an_error_naming_it(tmp_path, models_dir, data):
    chief, worker = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1,
                                   steps=-1, save_every=2, collective_timeout_s=5))
    line = _kill_one(chief, worker, survivor=chief)
    assert "worker 1 (127.0.0.1:" in line and "--restore_from latest" in line
    worker.finish()
    run = tmp_path / "checkpoint" / "dist"
    latest = run / latest_name(run)
    weights = _weights(latest)  # complete: every tensor reads back
    assert "model/wte" in weights and int(latest.name.split("-")[1]) >= 4


def test_a_killed_chief_ends_the_worker_and_a_restart_continues(tmp_path, models_dir, data):
    """kill -9 of the chief (TF_CONFIG with a "chief" task, as TFJob and Ray write it): the
    worker exits 1 within the deadline naming it; every worker restarted continues the run."""
    args = _args(tmp_path, models_dir, data, "dist", batch_size=1, steps=-1, save_every=2,
                 collective_timeout_s=5)
    chief, worker = _workers(args, layout=_chief_tf_config)
    line = _kill_one(chief, chief, survivor=worker)
    assert "lost contact with chief (127.0.0.1:" in line and "--restore_from latest" in line
    chief.finish()
    run = tmp_path / "checkpoint" / "dist"
    latest = run / latest_name(run)
    assert "model/wte" in _weights(latest)  # complete: every tensor reads back
    last = int(latest.name.split("-")[1])
    assert last >= 4

    kids = _workers(_args(tmp_path, models_dir, data, "dist", batch_size=1, steps=2,
                          restore_from="latest", collective_timeout_s=5),
                    layout=_chief_tf_config)
    results = [k.finish(timeout=180) for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert latest_name(run) == f"model-{last + 2}"
    assert sorted(losses(run))[-3:] == [last, last + 1, last + 2]


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


def test_tf_config_with_a_chief_and_other_task_types():
    """TFJob / Ray Train: the chief is worker 0, named as TF_CONFIG names it; a parameter
    server or an evaluator is a one-line error."""
    spec = {"chief": ["c:1"], "worker": ["w:1", "w:2"]}
    expect = distributed.Cluster(("c:1", "w:1", "w:2"), 0,
                                 labels=("chief", "worker 0", "worker 1"))
    for task, index in (({"type": "chief", "index": 0}, 0), ({"type": "worker", "index": 1}, 2)):
        cluster = distributed.parse_tf_config(json.dumps({"cluster": spec, "task": task}))
        assert cluster == dataclasses.replace(expect, task=index)
    assert cluster.name(0) == "chief (c:1)" and cluster.name(2) == "worker 1 (w:2)"
    alone = {"cluster": {"chief": ["c:1"]}, "task": {"type": "chief", "index": 0}}
    assert distributed.parse_tf_config(json.dumps(alone)) is None
    for kind in ("ps", "evaluator"):
        bad = {"cluster": {**spec, kind: ["p:1"]}, "task": {"type": "worker", "index": 0}}
        with pytest.raises(UserError, match=f"'{kind}' tasks: ParameterServerStrategy is not"):
            distributed.parse_tf_config(json.dumps(bad))
    bad = {"cluster": {"chief": ["c:1", "c:2"]}, "task": {"type": "chief", "index": 0}}
    with pytest.raises(UserError, match="at most one 'chief'"):
        distributed.parse_tf_config(json.dumps(bad))


def test_local_devices():
    """--devices on this CPU-only machine: N > 1 gives N logical CPU devices; 0 (every GPU)
    and 1 train alone; a worker of a cluster trains on one device."""
    assert distributed.local_devices(2) == ("/cpu:0", "/cpu:1")
    assert distributed.local_devices(0) == distributed.local_devices(1) == ()
    assert distributed.resolve("none", {}, devices=2) == distributed.Cluster(
        devices=("/cpu:0", "/cpu:1"))
    assert distributed.resolve("auto", {}, devices=1) is None
    workers = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    with pytest.raises(UserError, match="--devices 2: each worker of a cluster trains on one"):
        distributed.resolve("auto", {"TF_CONFIG": workers}, devices=2)


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
