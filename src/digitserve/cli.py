"""The ``digitserve`` command: every stage of the kit from a shell.

    digitserve check | data | train | archive | protos | serve start|stop|status | predict IMAGE...
    digitserve kserve|cluster start|stop|status (KServe; a two-node Ray Serve cluster)
    digitserve demo (the whole walkthrough, as `make demo`)
    digitserve report [--quick] (every notebook executed and rendered as HTML, `make report`)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from digitserve import config

#: Exit statuses of every command (also in ``digitserve --help``).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BAD_IMAGE, EXIT_INTERRUPTED = (
    0, 1, 2, 3, 4, 130)
EXIT_CODES = f"""exit status:
  {EXIT_OK}    done
  {EXIT_FAILED}    failed (the message says why)
  {EXIT_USAGE}    wrong command line
  {EXIT_UNREACHABLE}    TorchServe not running, not reachable, or busy (`digitserve serve status`)
  {EXIT_BAD_IMAGE}    bad image: unreadable, not an image, over the size limit
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
set DIGITSERVE_DEBUG=1 to see a Python traceback for an unexpected error."""


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command; its exit status is the return value.

    Every failure is one line on stderr and an exit status from EXIT_CODES, never a traceback.
    """
    logging.basicConfig(format="digitserve: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or EXIT_OK
    except KeyboardInterrupt:
        print(f"digitserve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - one line and an exit status, whatever failed
        if os.environ.get("DIGITSERVE_DEBUG") == "1":
            traceback.print_exc()
        print(f"digitserve {args.command}: {one_line(err)}", file=sys.stderr)
        return exit_status(err)


def one_line(err: BaseException) -> str:
    """The first line of an error's message; where it goes on with a log, where that log is."""
    from digitserve.client import ServingError
    from digitserve.server import ServerError

    lines = str(err).splitlines() or [""]
    text = lines[0]
    if not isinstance(err, (ServingError, ServerError, OSError)):
        text = f"unexpected {type(err).__name__}: {text} (DIGITSERVE_DEBUG=1 shows where)"
    logs = [line for line in lines[1:] if line.startswith("Last lines of ")]
    if logs:
        text += f" (see {logs[0].removeprefix('Last lines of ').rstrip(':')})"
    return text


def exit_status(err: BaseException) -> int:
    """The exit status for an error: EXIT_UNREACHABLE, EXIT_BAD_IMAGE or EXIT_FAILED."""
    from digitserve.client import InvalidInputError, RequestTooLargeError, ServerUnavailableError

    if isinstance(err, ServerUnavailableError):
        return EXIT_UNREACHABLE
    if isinstance(err, (InvalidInputError, RequestTooLargeError)):
        return EXIT_BAD_IMAGE
    return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitserve", description=__doc__.splitlines()[0],
                                     epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    stream = commands.add_parser(
        "stream", help="StreamPredictions (the kit's handler answers it with one message)")
    stream.add_argument("image", type=Path)
    stream.add_argument("--version", default="")
    stream.set_defaults(run=lambda args: management(
        args, lambda c: list(c.stream(args.image, version=args.version))))
    for command in (models, describe, register, unregister, scale, set_default, stream):
        command.add_argument("--json", action="store_true", help="print JSON")
    for command in (serve, models, describe, register, unregister, scale, set_default, stream):
        command.epilog, command.formatter_class = EXIT_CODES, argparse.RawDescriptionHelpFormatter

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
        "bench", help="when does gRPC pay off? gRPC and REST side by side (build/bench/)")
    bench.add_argument("--quick", action="store_true",
                       help="small counts, no lever servers (CI; not for reporting)")
    bench.set_defaults(run=run_bench)

    predict = commands.add_parser("predict", help="classify images over gRPC, one JSON line each")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--version", default="", help="model version (default: the default)")
    predict.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    predict.set_defaults(run=run_predict)
    predict.epilog, predict.formatter_class = EXIT_CODES, argparse.RawDescriptionHelpFormatter
    from digitserve import cluster, kserve_server  # lazily, like every command's imports

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
    from digitserve.train import FULL, QUICK, train

    ensure_mnist()
    settings = QUICK if args.quick else FULL
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
        server = TorchServe(settings).start()  # a stale record is removed, with a warning
        server.detach()  # the server outlives this command: `digitserve serve stop` ends it
        ports = server.settings.ports
        print(f"TorchServe is serving {spec.name} {spec.version}: gRPC inference "
              f"{config.HOST}:{ports.grpc_inference}, management {config.HOST}:"
              f"{ports.grpc_management}; key file {server.key_file}; logs in {server.run_dir}")
        return EXIT_OK
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
    return EXIT_OK if report.get("running") else EXIT_UNREACHABLE


def run_demo(args: argparse.Namespace) -> int:
    """Prepare MNIST, execute the notebooks in order, then say where everything is."""
    from digitserve.data import ensure_mnist, export_samples
    from digitserve.notebooks import read_metrics, run_all, time_table
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
    print(f"Archive:  {config.ARCHIVE_PATH}")
    print(f"Figures:  {config.FIGURES_DIR}")
    print(f"Test accuracy on the 10,000 MNIST test images: {training['test_accuracy']:.2%}")
    print(f"\nHow long each notebook took (papermill's record):\n{time_table(executed)}")
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
    """Run the benchmark of notebook 08; print the decision table and where the results went."""
    from digitserve import bench
    from digitserve.bench import tables

    results = bench.run_benchmark(bench.QUICK_BENCH if args.quick else bench.FULL_BENCH)
    print(tables.decision_table(results))
    print()
    print("\n".join(f"- {line}" for line in results["why_grpc"]["takeaways"]))
    print("\nResults:")
    for name, path in results["files"].items():
        print(f"  {name:22} {path}")
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
    """One JSON line per image; the exit status of the worst failure (unreachable first)."""
    from digitserve.client import DigitClient, ServingError

    failures: list[ServingError] = []
    with DigitClient.for_run_dir(config.RUN_DIR) as client:
        for image in args.images:
            try:
                prediction = client.predict(image, version=args.version)
                answer = {"image": str(image), **asdict(prediction)}
            except ServingError as err:
                failures.append(err)
                answer = {"image": str(image), "error": str(err)}
            print(json.dumps(answer))
    statuses = {exit_status(err) for err in failures}
    for status in (EXIT_UNREACHABLE, EXIT_BAD_IMAGE, EXIT_FAILED):
        if status in statuses:
            return status
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
