"""The Ray driver of ``digitserve.cluster``: it deploys the application and asks where replicas run.

It runs as a short-lived child process (``python -m digitserve.ray_driver deploy|describe
SETTINGS``, started by ``cluster``), so a notebook kernel or a test process never joins the
cluster as a driver. It prints one JSON line, its answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from digitserve.cluster import APP_NAME, HEAD_IP, KEY_FILE, NODE_NAMES, ClusterSettings
from digitserve.config import HOST


def _connect(settings: ClusterSettings) -> None:
    import ray

    ray.init(address=f"{HEAD_IP}:{settings.ports.gcs}", _node_ip_address=HEAD_IP,
             log_to_driver=False, logging_level="ERROR")


def deploy(settings: ClusterSettings) -> dict:
    """Start Serve (its proxy on the head node only) and run the application on the cluster.

    One proxy: two on one machine would both bind the gRPC port. The application needs a route
    prefix even for gRPC: without one it has no endpoint, and the proxy answers NOT_FOUND
    "Application metadata not set" to every call.
    """
    from ray import serve

    from digitserve import ray_app

    _connect(settings)
    serve.start(proxy_location="HeadOnly",
                http_options={"host": HOST, "port": settings.ports.serve_http},
                grpc_options={"port": settings.ports.serve_grpc,
                              "grpc_servicer_functions": list(ray_app.GRPC_SERVICERS)})
    serve.run(ray_app.build(str(settings.weights), str(Path(settings.run_dir) / KEY_FILE),
                            settings.model_name, settings.replicas, settings.max_batch_size,
                            settings.batch_wait_timeout_s),
              name=APP_NAME, route_prefix=f"/{APP_NAME}")
    return {"deployed": APP_NAME}


def describe(settings: ClusterSettings) -> dict:
    """The nodes and the replicas, each with the node it runs on (asked of Serve's controller)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    _connect(settings)
    names = {settings.ports.head_node_manager: NODE_NAMES[0],
             settings.ports.node_node_manager: NODE_NAMES[1]}
    nodes, by_id = [], {}
    for node in ray.nodes():
        name = names.get(node["NodeManagerPort"], node["NodeManagerAddress"])
        by_id[node["NodeID"]] = name
        nodes.append({"name": name, "address": node["NodeManagerAddress"], "alive": node["Alive"],
                      "cpus": node["Resources"].get("CPU", 0), "node_id": node["NodeID"]})
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_serve_instance_details.remote())
    replicas = []
    for deployment in details.get("applications", {}).get(APP_NAME, {}).get("deployments",
                                                                             {}).values():
        for replica in deployment.get("replicas", []):
            replicas.append({"node": by_id.get(replica.get("node_id"), replica.get("node_ip")),
                             "pid": replica.get("pid"), "state": replica.get("state"),
                             "replica_id": replica.get("replica_id")})
    return {"nodes": sorted(nodes, key=lambda n: n["name"]),
            "replicas": sorted(replicas, key=lambda r: (r["node"] or "", r["pid"] or 0))}


if __name__ == "__main__":
    action, settings_file = sys.argv[1], Path(sys.argv[2])
    settings = ClusterSettings.from_json(json.loads(settings_file.read_text()))
    print(json.dumps({"deploy": deploy, "describe": describe}[action](settings)))
