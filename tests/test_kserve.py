"""KServe's ModelServer for real, next to a real TorchServe: one OipClient call, the same
answers from both; KServe's own InferenceGRPCClient as the reference (integration)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from digitserve import kserve_server, oip, synthetic
from digitserve.client import InvalidInputError, ServingError
from digitserve.config import ARCHIVE_NAME, MODEL_NAME, MODEL_VERSION, KServePorts

pytestmark = pytest.mark.integration

N_IMAGES = 12
#: A busy 2-core machine answers slowly; the deadline of every call here.
CALL_DEADLINE_S = 60


def free_kserve_ports() -> KServePorts:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return KServePorts(http=a.getsockname()[1], grpc=b.getsockname()[1])


@pytest.fixture(scope="module")
def kserve(model_store: Path, tmp_path_factory, server_group_recorder):
    # Where `digitserve kserve` looks when DIGITSERVE_RUN_DIR is <tmp>/ts (see the CLI test).
    settings = kserve_server.KServeSettings(
        weights=model_store / f"{ARCHIVE_NAME}.mar", ports=free_kserve_ports(),
        run_dir=tmp_path_factory.mktemp("kserve") / "ts-kserve")
    report = kserve_server.start(settings)
    server_group_recorder(report["pid"])
    yield report
    kserve_server.stop(settings.run_dir)




@pytest.fixture(scope="module")
def images(mnist_test) -> list[np.ndarray]:
    return [image.numpy() for image in mnist_test[0][:N_IMAGES]]


def test_kserve_listens_on_loopback_only_on_the_kits_ports(kserve):
    ports = {int(address.rsplit(":", 1)[1]) for address in kserve["listening"]}
    assert ports == {int(kserve["grpc_target"].rsplit(":", 1)[1]),
                     int(kserve["http_target"].rsplit(":", 1)[1])}
    hosts = {address.rsplit(":", 1)[0] for address in kserve["listening"]}
    assert hosts <= {"127.0.0.1", "::ffff:127.0.0.1"}, hosts


def test_one_oip_call_same_answers_from_torchserve_and_kserve(kserve, oip_server, images):
    with oip.OipClient.for_run_dir(oip_server.run_dir, deadline_s=CALL_DEADLINE_S) as ts, \
            oip.OipClient.for_target(kserve["grpc_target"], deadline_s=CALL_DEADLINE_S) as ks:
        for image in images:
            for payload in (synthetic.png(image), image):  # BYTES, then a UINT8 tensor
                a, b = ts.infer(payload), ks.infer(payload)
                assert a["digit"] == b["digit"]
                assert a["probabilities"] == pytest.approx(b["probabilities"], abs=2e-6)
                assert a["model_name"] == b["model_name"] == MODEL_NAME
                assert a["model_version"] == b["model_version"] == MODEL_VERSION
        assert ts.service == oip.TORCHSERVE_SERVICE
        assert ks.service == oip.STANDARD_SERVICE
        assert ks.infer(synthetic.png(images[0]), request_id="id-9")["id"] == "id-9"
        assert ts.model_ready() and ks.model_ready()
        assert ks.server_metadata()["name"] == "kserve"


def test_kserve_own_client_is_the_reference(kserve, images):
    """KServe's InferenceGRPCClient (its stubs, its decoding) gets what OipClient gets."""
    with oip.OipClient.for_target(kserve["grpc_target"], deadline_s=CALL_DEADLINE_S) as ks:
        for image in images[:4]:
            png = synthetic.png(image)
            theirs = kserve_server.reference_infer(kserve["grpc_target"], png)
            ours = ks.infer(png)
            assert theirs["digit"] == [ours["digit"]]
            assert theirs["probabilities"] == ours["probabilities"]


def test_a_bad_image_is_invalid_argument_on_both(kserve, oip_server):
    with oip.OipClient.for_run_dir(oip_server.run_dir, deadline_s=CALL_DEADLINE_S) as ts, \
            oip.OipClient.for_target(kserve["grpc_target"], deadline_s=CALL_DEADLINE_S) as ks:
        for client in (ts, ks):
            with pytest.raises(InvalidInputError, match="not an image") as raised:
                client.infer(b"\x00\x01 not an image")
            assert raised.value.code == "INVALID_ARGUMENT"


def test_the_wrong_service_name_is_unimplemented_and_says_which_names(kserve):
    channel_client = oip.OipClient.for_target(kserve["grpc_target"],
                                              deadline_s=CALL_DEADLINE_S)
    pinned = oip.OipClient(channel_client.client, services=(oip.TORCHSERVE_SERVICE,))
    with pytest.raises(ServingError, match="inference.GRPCInferenceService") as raised:
        pinned.server_live()
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED.name
    channel_client.close()


def test_cli_status_json_then_stop_leaves_no_process(kserve):
    """``digitserve kserve status --json`` (from the state file), then ``stop`` ends it all."""
    run_dir = Path(kserve["log_file"]).parent
    env = {**os.environ, "DIGITSERVE_RUN_DIR": str(run_dir.parent / "ts")}
    done = subprocess.run([sys.executable, "-m", "digitserve.cli", "kserve", "status", "--json"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["grpc_target"] == kserve["grpc_target"] and report["model"] == MODEL_NAME
    done = subprocess.run([sys.executable, "-m", "digitserve.cli", "kserve", "stop"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
    assert not kserve_server.status(run_dir)["running"]
    left = [proc for proc in psutil.process_iter(["status"])
            if _group_of(proc) == kserve["pid"] and proc.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, f"KServe outlived `digitserve kserve stop`: {left}"


def _group_of(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.Error):
        return None
