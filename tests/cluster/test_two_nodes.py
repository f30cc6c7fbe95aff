"""A search on a two-node Ray cluster on this machine, and the loss of one node mid-search.

The head is ``ray start --head`` (:func:`bratstune.services.ray_head.start_ray_head`, as
``bratstune up`` starts it); the second node is ``ray start --address=127.0.0.1:PORT`` with its
own resources, run through ``tests/cluster/_ray_start.py`` (Ray's own CLI with only its
"not on Windows/macOS" multi-node guard lifted, so that every process stays on 127.0.0.1; the
module says why). Each node offers one CPU and each trial asks for one, so the first two trials
run one per node. Once a trial on the second node has reported an epoch (its checkpoint is
persisted), that node's whole process group is killed by its id (SIGKILL: raylet, agents and
the trial's worker), as a machine failure would. The space's ``failure.max_failures`` retry
policy (``tune.FailureConfig``) must then move the trial to the head, where it resumes from its
checkpoint, and the search must end with every trial finished.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from bratstune.services.processes import (
    free_port,
    group_members,
    listening_addresses,
    peer_addresses,
    start_group,
    stop_group,
    wait_until,
)
from bratstune.services.ray_head import start_ray_head, stop_ray_head

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.services, pytest.mark.slow, pytest.mark.stack]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EPOCHS = 3

#: The GCS declares a silent node dead after about 3 s instead of about 30 s (Ray's defaults).
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _start_worker_node(address: str, temp_dir: Path, log: Path, env: dict[str, str]) -> int:
    """``ray start --address`` (through ``_ray_start.py``) in its own process group; returns the group id."""
    command = [
        sys.executable,
        str(HERE / "_ray_start.py"),
        "start",
        f"--address={address}",
        "--num-cpus=1",
        "--num-gpus=0",
        '--resources={"second_node": 1}',
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        # every port Ray would take by default gets a free one: parallel clusters never collide
        *(
            f"--{name}={free_port()}"
            for name in (
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ),
    ]
    process = start_group(command, log=log, env=env)
    assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    return process.pid


def _alive_nodes() -> dict[str, dict]:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def _kill_when_a_trial_reported_there(
    placement: ModuleType, events_log: Path, node_id: str, groups: dict[str, int], seen: dict, done: threading.Event
) -> None:
    """Background: once a trial on ``node_id`` has reported an epoch, SIGKILL that node's process group.

    Just before, while trials run on both nodes, ``seen`` gets the TCP addresses every process of
    both nodes listens on and talks to.
    """
    deadline = time.monotonic() + 600
    while not done.is_set() and time.monotonic() < deadline:
        events = placement.read_events(events_log)
        if any(e["event"] == "reported" and e["node_id"] == node_id for e in events):
            pids = sorted(set(group_members(groups["head"])) | set(group_members(groups["second"])))
            seen.update(pids=pids, listening=listening_addresses(pids), peers=peer_addresses(pids))
            os.killpg(groups["second"], signal.SIGKILL)
            seen["killed_at"] = time.monotonic()
            return
        time.sleep(0.2)


def test_trials_span_two_nodes_and_survive_losing_one(tmp_path, ray_env, cluster_helper):
    import ray
    from mlflow.tracking import MlflowClient

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space, parse_spec
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    placement = cluster_helper("_placement")
    temp_dir = Path(tempfile.mkdtemp(prefix="b2n", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {**os.environ, **ray_env, **FAST_NODE_DEATH}
    head = worker_pgid = None
    started = time.monotonic()
    timings: dict[str, float] = {}
    try:
        head = start_ray_head(
            port=free_port(),
            dashboard_port=free_port(),
            temp_dir=temp_dir,
            log=tmp_path / "head.log",
            env=env,
            num_cpus=1,
            num_gpus=0,
        )
        worker_pgid = _start_worker_node(head["address"], temp_dir, tmp_path / "worker.log", env)
        ray.init(address=head["address"], include_dashboard=False, log_to_driver=False)
        assert wait_until(lambda: len(_alive_nodes()) == 2, timeout=60), ray.nodes()
        nodes = _alive_nodes()
        head_node = next(i for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        second_node = next(i for i, n in nodes.items() if "second_node" in n["Resources"])
        assert {n["NodeManagerAddress"] for n in nodes.values()} == {"127.0.0.1"}
        timings["cluster up"] = time.monotonic() - started

        # a small search: 3 trials of EPOCHS epochs, one CPU each, FIFO (every trial runs to the end)
        smoke = load_search_space(ROOT / "search_spaces" / "losses.yaml").smoke_variant()
        raw = copy.deepcopy(smoke.raw)
        raw.update(num_samples=3, max_concurrent_trials=2, scheduler={"type": "fifo", "max_t": EPOCHS})
        raw["base"].update(epochs=EPOCHS, steps_per_epoch=2)
        spec = parse_spec(raw, source=smoke.source)
        assert spec.failure.max_failures >= 1  # the space's own retry policy is what must save the trial
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        experiment_id = tracking.setup_mlflow("two-nodes", uri=uri)
        cohort = synthetic_cohort(cases=6, shape=(48, 48, 32), root=tmp_path / "data")
        data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")

        events_log = tmp_path / "attempts.jsonl"
        done = threading.Event()
        seen: dict = {}
        groups = {"head": head["pgid"], "second": worker_pgid}
        killer = threading.Thread(
            target=_kill_when_a_trial_reported_there,
            args=(placement, events_log, second_node, groups, seen, done),
            daemon=True,
        )
        killer.start()
        search_started = time.monotonic()
        try:
            outcome = run_search(
                spec,
                data,
                storage_path=tmp_path / "results",
                name="two-nodes",
                tracking_uri=uri,
                experiment_id=experiment_id,
                fit_fn=functools.partial(placement.record_attempts, log=str(events_log), hold_node=second_node),
                verbose=0,
            )
        finally:
            done.set()
            killer.join(timeout=10)
        timings["search"] = time.monotonic() - search_started
        if "killed_at" in seen:
            timings["search after the kill"] = time.monotonic() - seen["killed_at"]

        events = placement.read_events(events_log)
        starts = [e for e in events if e["event"] == "start"]
        first_node = {}
        for e in starts:
            first_node.setdefault(e["trial_id"], e["node_id"])
        on_second = [t for t, n in first_node.items() if n == second_node]
        print(f"nodes: head {head_node}, second {second_node}")
        for e in starts:
            where = "head" if e["node_id"] == head_node else "second"
            print(f"  trial {e['trial_id']} attempt on {where} node (pid {e['pid']}, resumed={e['resumed']})")
        per_node = {"head": sum(e["node_id"] == head_node for e in starts), "second": len(starts)}
        per_node["second"] -= per_node["head"]
        print(f"attempts per node: {per_node}; timings (s):", {k: round(v, 1) for k, v in timings.items()})

        # trials ran on both nodes
        assert set(first_node.values()) == {head_node, second_node}, starts
        assert on_second
        # the second node is gone: killed mid-search, declared dead by the GCS
        assert not group_members(worker_pgid)
        assert second_node not in _alive_nodes() and head_node in _alive_nodes()
        # every trial is accounted for: all finished, none in error, each ran all its epochs
        assert len(outcome.table) == 3 and outcome.errors == 0, outcome.table
        assert all(r["status"] == "TERMINATED" and r["epochs"] == EPOCHS for r in outcome.table), outcome.table
        # the trial that lost its node was retried on the head and resumed from its checkpoint
        for trial_id in on_second:
            later = [e for e in starts if e["trial_id"] == trial_id][1:]
            assert later and later[-1]["node_id"] == head_node and later[-1]["resumed"], starts
        client = MlflowClient(uri)
        for row in outcome.table:
            run = client.get_run(row["mlflow_run_id"])
            assert run.info.status == "FINISHED", (row, run.data.tags.get("stop_reason"))
            assert run.data.tags["ray.node_id"] == (
                head_node if row["trial_id"] in on_second else first_node[row["trial_id"]]
            )
        for trial_id in on_second:
            run = client.get_run(next(r["mlflow_run_id"] for r in outcome.table if r["trial_id"] == trial_id))
            assert run.data.tags.get("resumed") == "true"  # one MLflow run across both attempts

        # while trials ran on both nodes, every process of the cluster listened and talked on 127.0.0.1 only
        assert seen.get("listening"), "the second node was never killed"
        assert all(a.startswith("127.0.0.1:") for a in seen["listening"]), seen["listening"]
        assert all(a.startswith("127.0.0.1:") for a in seen["peers"]), seen["peers"]
        print(f"{len(seen['pids'])} processes, listening on {len(seen['listening'])} loopback ports")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if worker_pgid is not None:
            stop_group(worker_pgid, marker=str(temp_dir), grace=2)
        if head is not None:
            stop_ray_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
