"""Unit tests of the server module: config.properties, Java discovery, log diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digitserve.server import (
    DEFAULT_VMARGS,
    ModelSpec,
    ServerError,
    ServerSettings,
    TorchServe,
    config_properties,
    diagnose_log,
    find_java,
    free_ports,
)
from digitserve.tls import make_self_signed

pytestmark = pytest.mark.unit


def properties(settings: ServerSettings) -> dict[str, str]:
    lines = config_properties(settings).splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_everything_binds_to_loopback_with_token_auth_on(tmp_path):
    ports = free_ports()
    props = properties(ServerSettings(ports=ports, run_dir=tmp_path, model_store=tmp_path))
    assert props["inference_address"] == f"http://127.0.0.1:{ports.http_inference}"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["grpc_inference_port"] == str(ports.grpc_inference)
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == f"file://{tmp_path}/.*"
    assert props["max_request_size"] == props["max_response_size"]
    assert "enable_grpc_ssl" not in props


def test_model_batching_settings_reach_the_models_json(tmp_path):
    spec = ModelSpec(batch_size=8, max_batch_delay_ms=7, workers=2)
    props = properties(ServerSettings(run_dir=tmp_path, model_store=tmp_path, models=(spec,)))
    entry = json.loads(props["models"])["digitmodel"]["1.0"]
    assert (entry["batchSize"], entry["maxBatchDelay"], entry["minWorkers"]) == (8, 7, 2)
    assert props["load_models"] == "digitmodel=digit-model.mar"


def test_tls_settings(tmp_path):
    certificate = make_self_signed(tmp_path / "tls")
    props = properties(ServerSettings(run_dir=tmp_path, model_store=tmp_path, tls=certificate))
    assert props["enable_grpc_ssl"] == "true"
    assert Path(props["certificate_file"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert oct(certificate.key.stat().st_mode)[-3:] == "600"


def test_java_home_that_does_not_run_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-such-jdk"))
    java = find_java()
    assert java.source != "JAVA_HOME" and java.version >= 11


def test_log_diagnosis_names_the_missing_module():
    log = "ModuleNotFoundError: No module named 'captum'\nWorker died.\n"
    assert "'captum'" in diagnose_log(log)
    assert diagnose_log("Worker died.\n" * 3) is not None
    assert diagnose_log("Model digitmodel loaded.\n") is None


def test_vmargs_log4j2_config_and_environment_reach_torchserve(tmp_path):
    log4j2 = tmp_path / "log4j2.xml"
    log4j2.write_text("<Configuration/>")
    settings = ServerSettings(run_dir=tmp_path, model_store=tmp_path, vmargs="-Xmx512m",
                              log4j2_config=log4j2, environment={"OMP_WAIT_POLICY": "PASSIVE",
                                                                 "OMP_NUM_THREADS": "2"})
    assert properties(settings)["vmargs"] == "-Xmx512m"
    assert properties(ServerSettings(run_dir=tmp_path))["vmargs"] == DEFAULT_VMARGS
    server = TorchServe(settings)
    command = server._command(tmp_path / "config.properties")
    assert command[command.index("--log-config") + 1] == str(log4j2.resolve())
    assert "--log-config" not in TorchServe(ServerSettings(run_dir=tmp_path))._command(tmp_path)
    env = server._environment(find_java())
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == "2"  # set after the kit's own (torch_threads: 1)
    missing = TorchServe(ServerSettings(run_dir=tmp_path, log4j2_config=tmp_path / "nope.xml"))
    with pytest.raises(ServerError, match="nope.xml"):
        missing._command(tmp_path)
