"""What one request to the served model carries and what one answer holds.

``read_image`` takes an image as bytes or as a path and refuses, before reading, anything that
is not a regular file or is over the request limit; ``Prediction`` is one answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from digitserve.config import MAX_MESSAGE_BYTES
from digitserve.errors import InvalidInputError, RequestTooLargeError, ServingError

#: The most image bytes one request may carry: the message limit less room for the envelope.
MAX_IMAGE_BYTES = MAX_MESSAGE_BYTES - 4096


@dataclass(frozen=True)
class Prediction:
    """One answer of the served model."""

    digit: int
    probability: float
    probabilities: list[float]
    model_version: str

    @classmethod
    def from_json(cls, body: bytes) -> Prediction:
        try:
            answer = json.loads(body)
            if "error" in answer:
                raise InvalidInputError(str(answer["error"])[:500], "OK")
            return cls(answer["digit"], answer["probability"], answer["probabilities"],
                       answer.get("model_version", ""))
        except (ValueError, TypeError, KeyError) as err:
            raise ServingError(f"TorchServe's answer is not a prediction ({err!r:.100}): "
                               f"{bytes(body)[:100]!r}", "OK") from None


def read_image(image: bytes | str | Path) -> bytes:
    """The bytes of an image given as bytes or as a path, refused before reading when the file
    is not a regular file or is over the request limit (so ``/dev/zero`` is never read)."""
    if not isinstance(image, (str, Path)):
        data = bytes(image)
    else:
        path = Path(image)
        try:
            if not path.is_file():
                kind = "a directory" if path.is_dir() else (
                    "not a regular file" if path.exists() else "not found")
                raise InvalidInputError(f"{path} is {kind}: give the path of an image file.")
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise RequestTooLargeError(_too_large(size))
            with open(path, "rb") as file:
                data = file.read(MAX_IMAGE_BYTES + 1)
        except OSError as err:
            raise InvalidInputError(f"cannot read {path}: {err.strerror or err}.") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestTooLargeError(_too_large(len(data)))
    return data


def _too_large(size: int) -> str:
    return (f"the image is {size:,} bytes; requests are limited to {MAX_IMAGE_BYTES:,} bytes of "
            "image (config.MAX_MESSAGE_BYTES, shared with the server): scale it down.")
