"""When does gRPC pay off, and when is REST just as good? The benchmark behind notebook 08.

One run measures, on the same MNIST digits and the same CPU:

- the in-process floor: the handler's own code with no server (``floor``);
- the main servers, gRPC and REST side by side at one and many callers (``servers``);
- the situations where the two protocols may differ (``situations``, ``load_async``): reusing a
  connection or not (plaintext and TLS), many calls in flight on one HTTP/2 channel or an
  HTTP/1.1 pool, deadlines shorter than the batch delay, payload size and encoding, and one
  call taken apart on the wire (``onwire``);
- the levers that move the figures (``levers``).

``analysis`` turns the measurements into verdicts (gRPC, REST or a tie), the time breakdown
of one call, the decision table and the takeaways; ``tables`` and ``figures`` show them;
``run.BenchRun`` runs it all in stages and writes ``build/bench/`` (``why_grpc.json``,
``results.json``, ``results.csv``, ``results.md`` and the figures). Module map:

    settings     BenchSettings, FULL_BENCH / QUICK_BENCH, ServerConfig → ServerSettings,
                 the shipped log4j2 files, an RSA certificate for REST over TLS
    load         synchronous callers (gRPC, REST kept alive or not, TLS) and ``drive``
    load_async   many calls in flight: grpc.aio against aiohttp
    floor        the handler's work in this process
    servers      one TorchServe for the benchmark: cold start, warm-up, callers, main rows
    serverlogs   what TorchServe's own log lines say about a measurement's calls
    situations   connection reuse, many callers, deadlines, payload, encoding
    onwire       the bytes of one gRPC and one REST call, split into frames and headers
    levers       in-process and server levers
    analysis     verdicts, time breakdown, decision table, takeaways
    tables       markdown tables, findings, the files of a run
    figures      the PNG figures
    run          BenchRun (the stages) and run_benchmark
"""

from digitserve.bench.run import BenchRun, run_benchmark
from digitserve.bench.settings import (
    BENCH_DIR,
    FULL_BENCH,
    QUICK_BENCH,
    TIE_TOLERANCE,
    BenchSettings,
    ServerConfig,
)
from digitserve.bench.tables import WHY_GRPC_JSON

__all__ = ["BENCH_DIR", "FULL_BENCH", "QUICK_BENCH", "TIE_TOLERANCE", "WHY_GRPC_JSON",
           "BenchRun", "BenchSettings", "ServerConfig", "run_benchmark"]
