"""A real two-node Ray cluster on this machine serving DigitCNN behind the kit's own gRPC
contract: replicas on both nodes, the kit's DigitClient unchanged, the key checked, a replica
killed under 16 callers without losing a call, and nothing left after stop (integration).

The tests share one cluster and run in file order; the last one stops it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import record_cluster

from digitserve import beyond, cluster, oip, synthetic
from digitserve.client import AuthError, DigitClient, InvalidInputError, ModelNotFoundError
from digitserve.config import ARCHIVE_NAME, MODEL_NAME, ClusterPorts

pytestmark = pytest.mark.integration

#: Port blocks tried for the test cluster (the block's first port), on a free one.
BLOCKS = range(21_000, 32_000, 100)
CALL_DEADLINE_S = 60
N_IMAGES = 16


def free_block() -> ClusterPorts:
    for block in BLOCKS:
        ports = ClusterPorts.at(block)
        if all(cluster.bindable(port) for port in cluster.all_ports(ports)):
            return ports
    pytest.fail(f"no block of free ports in {BLOCKS}")


@pytest.fixture(scope="module")
def started(model_store: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cluster")
    settings = cluster.ClusterSettings(weights=model_store / f"{ARCHIVE_NAME}.mar",
                                       ports=free_block(), run_dir=root / "run-cluster")
    try:
        report = cluster.start(settings)
    finally:  # recorded even when start failed half-way: the session checks what is left
        record_cluster({"process_groups": [], "temp_dir": str(settings.temp_dir)})
    record_cluster(report)
    yield {"report": report, "settings": settings}
    cluster.stop(settings.run_dir)


@pytest.fixture(scope="module")
def pngs(mnist_test) -> list[bytes]:
    return [synthetic.png(image) for image in mnist_test[0][:N_IMAGES].numpy()]


def test_replicas_run_on_both_nodes(started):
    report = started["report"]
    assert report["running"] and report["model"] == MODEL_NAME
    assert {node["name"] for node in report["nodes"]} == set(cluster.NODE_NAMES)
    assert all(node["alive"] and node["cpus"] == 1 for node in report["nodes"])
    assert sorted(replica["node"] for replica in report["replicas"]) == sorted(cluster.NODE_NAMES)
    assert {replica["state"] for replica in report["replicas"]} == {"RUNNING"}
    assert {node["address"] for node in report["nodes"]} == {cluster.HEAD_IP, cluster.NODE_IP}


def test_the_key_file_is_the_users_alone(started):
    key_file = Path(started["report"]["key_file"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert json.loads(key_file.read_text())["inference"]["key"]


def test_digit_client_unchanged_gets_torchserve_answers(started, server, pngs):
    """The session's TorchServe and the cluster, called by the same DigitClient code."""
    target = started["report"]["grpc_target"]
    with DigitClient(target, target, key_file=Path(started["report"]["key_file"]),
                     deadline_s=CALL_DEADLINE_S) as on_cluster, \
            DigitClient.for_run_dir(server.run_dir, deadline_s=CALL_DEADLINE_S) as on_torchserve:
        assert on_cluster.ping() == on_torchserve.ping() == "Healthy"
        for png in pngs:
            a, b = on_cluster.predict(png), on_torchserve.predict(png)
            assert a.digit == b.digit and a.model_version == b.model_version
            assert a.probabilities == pytest.approx(b.probabilities, abs=2e-6)
        with pytest.raises(InvalidInputError, match="not an image"):
            on_cluster.predict(b"\x00\x01 not an image")
        with pytest.raises(ModelNotFoundError):
            on_cluster.predict(pngs[0], model="nosuchmodel")
        with oip.OipClient(on_cluster) as portable:  # ModelInfer, TorchServe's service name
            assert portable.infer(pngs[0])["digit"] == on_torchserve.predict(pngs[0]).digit


def test_no_key_or_a_wrong_key_is_refused(started, pngs, tmp_path):
    target = started["report"]["grpc_target"]
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
    for key_file in (None, wrong):
        with DigitClient(target, target, key_file=key_file, deadline_s=CALL_DEADLINE_S) as c:
            with pytest.raises(AuthError) as raised:
                c.predict(pngs[0])
            assert raised.value.code == "PERMISSION_DENIED"
            with pytest.raises(AuthError):
                c.ping()


def test_a_replica_killed_under_16_callers_loses_no_call(started, pngs):
    """SIGKILL one replica while 16 threads predict: every call answers, right; Serve then
    brings the deployment back to two replicas."""
    result = beyond.replica_killed_under_load(started["settings"].run_dir, pngs, calls=160,
                                              callers=16)
    assert result["failures"] == [], result["failures"][:3]
    assert result["answered"] == 160 and result["wrong"] == 0
    assert result["replaced_after_s"] is not None, "Serve did not replace the killed replica"


def test_cli_status_json(started):
    run_dir = started["settings"].run_dir
    env = {**os.environ, "DIGITSERVE_RUN_DIR": str(run_dir.parent / "run")}
    done = subprocess.run([sys.executable, "-m", "digitserve.cli", "cluster", "status", "--json"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("grpc_target", "key_file", "model", "nodes", "replicas"):
        assert key in report, key
    assert all("node" in replica for replica in report["replicas"])


def test_stop_leaves_no_ray_process(started):
    """Last: ``stop`` ends every process of both nodes (workers and replicas included)."""
    state = cluster.status(started["settings"].run_dir, describe=False)
    assert state["running"] and state["processes"] > 5
    assert cluster.stop(started["settings"].run_dir) is True
    assert cluster.cluster_processes(state) == []
    assert not Path(state["temp_dir"]).exists()
    assert cluster.status(started["settings"].run_dir)["running"] is False
