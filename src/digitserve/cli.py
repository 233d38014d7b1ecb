"""The ``digitserve`` command: every stage of the kit from a shell.

    digitserve check | data | train | archive | protos | serve start|stop|status | predict IMAGE...
    digitserve kserve|cluster start|stop|status (KServe; a two-node Ray Serve cluster)
    digitserve demo (the whole walkthrough, as `make demo`)
    digitserve report [--quick] (every notebook executed and rendered as HTML, `make report`)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from digitserve import config


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command; its exit status is the return value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from digitserve.client import ServingError
    from digitserve.server import ServerError

    try:
        return args.run(args) or 0
    except (ServingError, ServerError, FileNotFoundError, RuntimeError) as err:
        print(f"digitserve {args.command}: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="check torch/torchvision and Java on this machine")
    check.set_defaults(run=run_check)

    data = commands.add_parser("data", help="put MNIST under data/ and export sample PNGs")
    data.add_argument("--per-digit", type=int, default=2, help="sample PNGs per digit")
    data.set_defaults(run=run_data)

    train = commands.add_parser("train", help="train DigitCNN and save weights and metrics")
    train.add_argument("--quick", action="store_true", help="the CI setting (~1 min, ≥ 95 %%)")
    train.add_argument("--epochs", type=int, help="override the number of epochs")
    train.set_defaults(run=run_train)

    archive = commands.add_parser("archive", help="build model_store/digit-model.mar")
    archive.add_argument("--weights", type=Path, default=config.WEIGHTS_PATH)
    archive.add_argument("--version", default=config.MODEL_VERSION)
    archive.set_defaults(run=run_archive)

    protos = commands.add_parser("protos", help="regenerate the gRPC stubs from protos/")
    protos.add_argument("--check", action="store_true",
                        help="only check that protos/ matches the jar and the stubs are fresh")
    protos.set_defaults(run=run_protos)

    serve = commands.add_parser("serve", help="start, stop or inspect TorchServe")
    serve.add_argument("action", choices=("start", "stop", "status"))
    serve.add_argument("--json", action="store_true", help="status as JSON")
    serve.add_argument("--batch-size", type=int, default=1)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--enable-model-api", action="store_true",
                       help="allow register/unregister (from the local model store only)")
    serve.set_defaults(run=run_serve)

    models = commands.add_parser("models", help="ListModels (every page)")
    models.set_defaults(run=lambda args: management(args, lambda c: c.list_models()))
    describe = commands.add_parser("describe", help="DescribeModel")
    describe.add_argument("--version", default="", help="a version, or 'all'")
    describe.add_argument("--customized", action="store_true", help="ask the handler too")
    describe.set_defaults(run=lambda args: management(
        args, lambda c: c.describe(version=args.version, customized=args.customized)))
    register = commands.add_parser("register", help="RegisterModel from the model store")
    register.add_argument("mar", help="file name in the model store, e.g. digit-model-v2.mar")
    register.add_argument("--workers", type=int, default=1)
    register.add_argument("--batch-size", type=int, default=1)
    register.set_defaults(run=lambda args: management(args, lambda c: c.register(
        args.mar, initial_workers=args.workers, batch_size=args.batch_size)))
    unregister = commands.add_parser("unregister", help="UnregisterModel")
    unregister.add_argument("--version", default="")
    unregister.set_defaults(run=lambda args: management(
        args, lambda c: c.unregister(args.version)))
    scale = commands.add_parser("scale", help="ScaleWorker")
    scale.add_argument("workers", type=int)
    scale.add_argument("--version", default="")
    scale.set_defaults(run=lambda args: management(
        args, lambda c: c.scale(args.workers, version=args.version)))
    set_default = commands.add_parser("set-default", help="SetDefault")
    set_default.add_argument("version")
    set_default.set_defaults(run=lambda args: management(
        args, lambda c: c.set_default(args.version)))
    stream = commands.add_parser("stream", help="StreamPredictions: top-3 first, then the answer")
    stream.add_argument("image", type=Path)
    stream.add_argument("--version", default="")
    stream.set_defaults(run=lambda args: management(
        args, lambda c: list(c.stream(args.image, version=args.version))))
    for command in (models, describe, register, unregister, scale, set_default, stream):
        command.add_argument("--json", action="store_true", help="print JSON")

    demo = commands.add_parser("demo", help="run every notebook at its full setting (make demo)")
    demo.add_argument("--quick", action="store_true", help="the CI setting of every notebook")
    demo.set_defaults(run=run_demo)

    report = commands.add_parser(
        "report", help="run every notebook and render them as HTML in build/report (make report)")
    report.add_argument("--quick", action="store_true", help="the CI setting of every notebook")
    report.add_argument("--no-solutions", action="store_true",
                        help="leave solutions.ipynb out (a report to send to participants)")
    report.add_argument("--no-execute", action="store_true",
                        help="render the executed notebooks already in build/notebooks")
    report.set_defaults(run=run_report)

    bench = commands.add_parser(
        "bench", help="measure TorchServe (gRPC, REST, streaming) against in-process inference")
    bench.add_argument("--quick", action="store_true",
                       help="small counts, two servers, no levers (CI; not for reporting)")
    bench.set_defaults(run=run_bench)

    predict = commands.add_parser("predict", help="classify images over gRPC, one JSON line each")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--version", default="", help="model version (default: the default)")
    predict.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    predict.set_defaults(run=run_predict)

    from digitserve import cluster, kserve_server

    kserve_server.add_commands(commands)
    cluster.add_commands(commands)
    return parser


def run_check(args: argparse.Namespace) -> int:
    """Fail with a plain message when torch/torchvision or Java cannot run here."""
    try:
        import torch
        import torchvision
        from torchvision.ops import nms

        nms(torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([0.9, 0.8]), 0.5)
    except Exception as err:  # noqa: BLE001 - the point is to explain any failure plainly
        print(
            f"torch/torchvision do not work together here ({type(err).__name__}: {err}).\n"
            "They must be installed as the pinned pair from pyproject.toml: run `make env` "
            "again after `rm -rf .venv`.",
            file=sys.stderr,
        )
        return 1
    from digitserve.server import find_java

    java = find_java()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: nms runs")
    print(f"Java {java.version} from {java.source}: {java.executable}")
    return 0


def run_data(args: argparse.Namespace) -> int:
    from digitserve.data import ensure_mnist, export_samples

    root = ensure_mnist()
    samples = export_samples(per_digit=args.per_digit)
    print(f"MNIST ready under {root}; {len(samples)} sample PNGs in {config.SAMPLES_DIR}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from digitserve.data import ensure_mnist
    from digitserve.train import QUICK_SETTINGS, TrainSettings, train

    ensure_mnist()
    settings = QUICK_SETTINGS if args.quick else TrainSettings()
    if args.epochs:
        settings = replace(settings, epochs=args.epochs)
    metrics = train(settings)
    print(f"test accuracy {metrics['test_accuracy']:.4f} in {metrics['wall_time_s']} s; "
          f"weights: {metrics['weights']}")
    return 0


def run_archive(args: argparse.Namespace) -> int:
    from digitserve.archive import build_archive

    print(build_archive(args.weights, version=args.version))
    return 0


def run_protos(args: argparse.Namespace) -> int:
    import filecmp
    import tempfile

    from digitserve import protos

    if not args.check:
        for path in protos.generate_stubs():
            print(path)
        return 0
    stale = [name for name in protos.PROTO_FILES
             if protos.jar_proto(name) != (config.PROTOS_DIR / name).read_bytes()]
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in protos.generate_stubs(out=Path(tmp)):
            if not filecmp.cmp(fresh, protos.STUBS_DIR / fresh.name, shallow=False):
                stale.append(fresh.name)
    if stale:
        print(f"stale: {', '.join(stale)}; run `digitserve protos`", file=sys.stderr)
        return 1
    print("protos/ matches the TorchServe jar and the stubs are up to date")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from digitserve.server import ModelSpec, ServerSettings, TorchServe, status, stop_run_dir

    if args.action == "start":
        spec = ModelSpec(batch_size=args.batch_size, workers=args.workers)
        settings = ServerSettings(models=(spec,), enable_model_api=args.enable_model_api)
        stale = status(config.RUN_DIR)
        if stale.get("pid") and not stale.get("running"):
            stop_run_dir(config.RUN_DIR)
            print(f"cleaned up a stale server record (pid {stale['pid']})")
        server = TorchServe(settings)
        server.start()
        # The server outlives this command: it is stopped with `digitserve serve stop`.
        import atexit

        atexit.unregister(server.stop)
        ports = server.settings.ports
        print(f"TorchServe is serving {spec.name} {spec.version}: gRPC inference "
              f"{config.HOST}:{ports.grpc_inference}, management {config.HOST}:"
              f"{ports.grpc_management}; key file {server.key_file}; logs in {server.run_dir}")
        return 0
    if args.action == "stop":
        print("TorchServe stopped" if stop_run_dir(config.RUN_DIR)
              else f"no TorchServe was running from {config.RUN_DIR}")
        return 0
    report = status(config.RUN_DIR)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["message"])
        if report.get("running"):
            ports = report["ports"]
            print(f"gRPC inference {report['host']}:{ports['grpc_inference']}, management "
                  f"{report['host']}:{ports['grpc_management']}; key file {report['key_file']}")
    return 0 if report.get("running") else 3


def run_demo(args: argparse.Namespace) -> int:
    """Prepare MNIST, execute the notebooks in order, then say where everything is."""
    from digitserve.data import ensure_mnist, export_samples
    from digitserve.notebooks import read_metrics, run_all
    from digitserve.server import stop_run_dir

    ensure_mnist()
    export_samples()
    try:
        executed = run_all(quick=args.quick)
    finally:
        stop_run_dir(config.RUN_DIR)
    training = read_metrics("01_train")
    print("\nThe walkthrough ran. Executed notebooks:")
    for path in executed:
        print(f"  {path}")
    print(f"Weights:  {config.WEIGHTS_PATH}")
    print(f"Archive:  {config.MODEL_STORE / (config.ARCHIVE_NAME + '.mar')}")
    print(f"Figures:  {config.FIGURES_DIR}")
    print(f"Test accuracy on the 10,000 MNIST test images: {training['test_accuracy']:.2%}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Execute every notebook (lessons, then exercises and solutions) and render it as HTML."""
    from digitserve.data import ensure_mnist, export_samples
    from digitserve.report import build_report

    if not args.no_execute:
        ensure_mnist()
        export_samples()
    index = build_report(quick=args.quick, execute=not args.no_execute,
                         solutions=not args.no_solutions)
    print(f"\nThe report: {index}\nOpen it in a browser (it needs no internet), or zip "
          f"{index.parent} and send it.")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark of notebook 07; print where the results went and the main table."""
    from digitserve import bench

    results = bench.run_benchmark(bench.QUICK if args.quick else bench.FULL)
    print(bench.markdown_table(results))
    print()
    print(bench.targets_table(results))
    print("\nResults:")
    for name, path in results["files"].items():
        print(f"  {name:15} {path}")
    return 0


def management(args: argparse.Namespace, call) -> int:
    """Run one client call against the server of this run directory and print its answer."""
    from digitserve.client import DigitClient

    with DigitClient.for_run_dir(config.RUN_DIR) as client:
        answer = call(client)
    if args.json or not isinstance(answer, str):
        print(json.dumps(answer, indent=2))
    else:
        print(answer)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from digitserve.client import DigitClient, ServingError

    failures = 0
    with DigitClient.for_run_dir(config.RUN_DIR) as client:
        for image in args.images:
            try:
                prediction = client.predict(image, version=args.version)
                answer = {"image": str(image), **asdict(prediction)}
            except (ServingError, OSError) as err:
                failures += 1
                answer = {"image": str(image), "error": str(err)}
            print(json.dumps(answer))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
