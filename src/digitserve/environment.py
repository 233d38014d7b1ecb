"""The environment TorchServe and its workers run in: the kit's, not whatever the shell had.

TorchServe 0.12.0 and its Python worker read many variables besides their config file (found in
its source: ``model_server.py``, ``ConfigManager.java``, ``EnvironmentUtils.java``,
``model_service_worker.py``, ``otf_message_handler.py``, ``base_handler.py``). A learner who used
TorchServe before may have set some of them; each could replace the kit's hardened
``config.properties``, change how models load, or silence the workers. The kit drops them from
the server's environment and says so, one line per variable.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Variables dropped, and why (one line each, shown when one is dropped).
DROPPED = {
    "TS_CONFIG_FILE": "TorchServe would read that file in place of the kit's config.properties "
                      "(its addresses, token and model API settings)",
    "TS_OPEN_INFERENCE_PROTOCOL": "it switches the gRPC inference API to another protocol",
    "TS_MODEL_SERVER_HOME": "it points TorchServe at another installation",
    "LOG_LOCATION": "it moves the logs out of the run directory",
    "METRICS_LOCATION": "it moves the metrics logs out of the run directory",
    "SM_TELEMETRY_LOG": "it turns on SageMaker telemetry logging",
    "JAVA_TOOL_OPTIONS": "it adds JVM flags (agents, system properties) to the frontend",
    "_JAVA_OPTIONS": "it adds JVM flags that override the kit's vmargs",
    "JDK_JAVA_OPTIONS": "it adds JVM flags to the frontend",
    "PYTHONPATH": "TorchServe puts it before the model's own files, so modules of yours named "
                  "like the archive's (model, preprocessing, handler) would load in their place",
    "PYTHONHOME": "it points the workers at another Python's standard library",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "it lets torch.load run pickled code from weight files",
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "it changes how torch.load reads weight files",
    "PYTORCH_JIT": "it turns off TorchScript, which the handler uses to serve the model",
    "ENABLE_TORCH_PROFILER": "it makes every worker profile and write traces",
    "LOCAL_RANK": "a worker with a LOCAL_RANK other than 0 never sends its answers",
    "RANK": "it is torchrun's, for distributed workers",
    "WORLD_SIZE": "it is torchrun's, for distributed workers",
    "LOCAL_WORLD_SIZE": "it is torchrun's, for distributed workers",
}
#: Every other TS_* variable: TorchServe reads TS_<PROPERTY> over config.properties when
#: enable_envvars_config is on, and its workers read TS_DECODE_INPUT_REQUEST, TS_BENCHMARK,
#: TS_IPEX_*, TS_REQUEST_SEQUENCE_*.
DROPPED_PREFIX = "TS_"
PREFIX_REASON = "TorchServe's TS_* variables change its configuration or its workers"


def reason(name: str) -> str | None:
    """Why ``name`` is kept out of TorchServe's environment, or None when it may pass."""
    if name in DROPPED:
        return DROPPED[name]
    if name.startswith(DROPPED_PREFIX):
        return PREFIX_REASON
    return None


def kit_environment(inherited: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The inherited environment without the variables the kit owns, and those dropped with
    the reason for each."""
    dropped = {name: why for name in sorted(inherited) if (why := reason(name))}
    return {k: v for k, v in inherited.items() if k not in dropped}, dropped


def dropped_lines(dropped: Mapping[str, str]) -> list[str]:
    """One line per dropped variable, for the log and the terminal."""
    return [f"left {name} out of TorchServe's environment: {why}." for name, why in dropped.items()]
