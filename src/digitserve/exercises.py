"""The checks of the workshop's exercises: one definition for ``exercises.ipynb`` and
``solutions.ipynb``.

Each exercise leaves an answer in a notebook variable (``None`` or empty until it is done); the
check cell after it hands that answer to one method of ``Checks``, which runs it against the
server, shows the result, or says the exercise is not done yet. ``Checks.results()`` is what
the notebook's last cell records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from IPython.display import display
from matplotlib.figure import Figure

from digitserve import draw, plots
from digitserve.client import DigitClient, Prediction, ServingError

#: How many exercises there are; each check says "Exercise N is not done yet" until it is.
N_EXERCISES = 5
#: The most mistakes (in red) and the total of images exercise 4's grid shows.
SHOWN_MISTAKES, SHOWN_IMAGES = 10, 20


def not_done(number: int, what: str) -> None:
    """Say, in the words the tests look for, that an exercise still waits for its answer."""
    print(f"Exercise {number} is not done yet: {what}")


class Checks:
    """The answers checked so far, against one server and one set of test images."""

    def __init__(self, client: DigitClient, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.client = client
        self.images, self.labels = images, labels
        self.drawn: dict | None = None
        self.handler_description: dict | None = None
        self.bad_requests: list[dict] = []
        self.served_accuracy: float | None = None
        self.failed_calls: int | None = None
        self.most_confused: tuple[int, int, int] | None = None
        self.confusion: list[list[int]] | None = None
        self.throughput: dict[int, float] = {}

    # -- exercise 1 -------------------------------------------------------------------------
    def drawing(self, strokes: Sequence | None, intended: int) -> Prediction | None:
        """Send the strokes drawn as a PNG and show the answer beside the drawing."""
        if strokes is None:
            not_done(1, "set my_strokes in the cell above.")
            return None
        png = draw.png_from_strokes(strokes)
        answer = self.client.predict(png)
        print(f"You drew a {intended}; TorchServe says {answer.digit} ({answer.probability:.1%}).")
        display(draw.probability_chart(png, answer))
        self.drawn = {"intended": intended, "predicted": answer.digit,
                      "probability": answer.probability, "probabilities": answer.probabilities}
        return answer

    # -- exercise 2 -------------------------------------------------------------------------
    def description(self, described: Mapping | None) -> dict | None:
        """Split DescribeModel's answer into the frontend's fields and the handler's own."""
        if described is None:
            not_done(2, "set described in the cell above.")
            return None
        print("From TorchServe's frontend:",
              ", ".join(key for key in described if key != "customizedMetadata"))
        handler_says = described.get("customizedMetadata")
        if isinstance(handler_says, str):  # TorchServe passes the handler's answer on as text
            handler_says = json.loads(handler_says)
        print("From the handler (describe_handle):")
        print(json.dumps(handler_says, indent=2))
        self.handler_description = handler_says
        return handler_says

    # -- exercise 3 -------------------------------------------------------------------------
    def bad(self, requests: Mapping[str, bytes]) -> None:
        """Send each bad payload and tabulate what came back (or that nothing was sent)."""
        if not requests:
            not_done(3, "fill bad_requests in the cell above.")
            return
        rows = []
        for case, payload in requests.items():
            try:
                self.client.predict(payload)
                rows.append({"request": case, "exception": "(answered!)", "code": "OK",
                             "message": ""})
            except ServingError as err:
                rows.append({"request": case, "exception": type(err).__name__,
                             "code": err.code or "(not sent)", "message": str(err)})
        self.bad_requests = rows
        display(plots.markdown_table(["request", "exception", "gRPC status", "message"],
                                     [tuple(row.values()) for row in rows]))

    # -- exercise 4 -------------------------------------------------------------------------
    def confusions(self, served: Sequence[Prediction | Exception] | None,
                   most_confused: tuple[int, int, int] | None) -> None:
        """Score the served answers, check the pair named against them, show some mistakes."""
        if served is None or most_confused is None:
            not_done(4, "set served and most_confused in the cell above.")
            return
        truth = self.labels[: len(served)].tolist()
        failed = [answer for answer in served if isinstance(answer, Exception)]
        self.failed_calls = len(failed)
        if failed:
            print(f"{len(failed)} calls failed, e.g. {type(failed[0]).__name__}: {failed[0]}")
        answered = [i for i, answer in enumerate(served) if not isinstance(answer, Exception)]
        wrong = [i for i in answered if served[i].digit != truth[i]]
        right = [i for i in answered if served[i].digit == truth[i]]
        self.served_accuracy = len(right) / len(answered) if answered else 0.0
        confusion = torch.zeros(10, 10, dtype=torch.long)
        for i in wrong:
            confusion[truth[i], served[i].digit] += 1
        self.confusion = confusion.tolist()
        self.most_confused = tuple(int(value) for value in most_confused)
        a, b, count = self.most_confused
        print(f"{self.served_accuracy:.1%} of {len(answered)} right through the server; "
              + (f"you found {a} and {b}, mixed up {count} time{'s' * (count != 1)}"
                 if count else "you found no mistake at all"))
        pairs = confusion + confusion.T
        if int(pairs.max()) != count or (count and int(pairs[a, b]) != count):
            first, second = divmod(int(pairs.argmax()), 10)
            print(f"Check again: the pair mixed up most is {min(first, second)} and "
                  f"{max(first, second)}, {int(pairs.max())} times.")
        shown = sorted(wrong[:SHOWN_MISTAKES] + right[: SHOWN_IMAGES - len(wrong[:SHOWN_MISTAKES])])
        display(plots.predictions_grid([self.images[i] for i in shown], [truth[i] for i in shown],
                                       [served[i] for i in shown]))

    # -- exercise 5 -------------------------------------------------------------------------
    def batching(self, throughput: Mapping[int, float], images: int) -> None:
        """A bar chart of predictions per second for each batch size measured."""
        if not throughput:
            not_done(5, "fill throughput in the cell above.")
            return
        self.throughput = dict(throughput)
        fig = Figure(figsize=(5, 3), layout="constrained")
        ax = fig.subplots()
        sizes = sorted(throughput)
        ax.bar([str(size) for size in sizes], [throughput[size] for size in sizes],
               color="tab:blue")
        ax.set(xlabel="batch_size", ylabel="predictions per second",
               ylim=(0, 1.2 * max(throughput.values())),
               title=f"{images} predictions, 16 calls in flight")
        for x, size in enumerate(sizes):
            ax.text(x, throughput[size], f"{throughput[size]:.0f}/s", ha="center", va="bottom")
        display(fig)

    def results(self) -> dict:
        """Every answer checked, in the shape the notebook's last cell records."""
        return {
            "drawn": self.drawn,
            "handler_description": self.handler_description,
            "bad_requests": self.bad_requests,
            "served_accuracy": self.served_accuracy,
            "failed_calls": self.failed_calls,
            "most_confused": self.most_confused,
            "confusion": self.confusion,
            "throughput": {str(size): rate for size, rate in self.throughput.items()},
        }
