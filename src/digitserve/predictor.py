"""DigitCNN in-process, served exactly as TorchServe's handler serves it: for the other servers.

KServe's ModelServer (``digitserve.kserve_server``) and the Ray Serve deployment
(``digitserve.ray_app``) both answer through ``DigitPredictor``: the very weights TorchServe
serves (read from the ``.mar``, or a state_dict file), the same frozen model
(``model.for_serving``), the same preprocessing and the same answer
(``digitserve.preprocessing``). So the same image gets the same answer from every server.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digitserve import preprocessing
from digitserve.config import MODEL_VERSION
from digitserve.model import DigitCNN, for_serving

#: The answer's three Open Inference Protocol outputs: name, datatype, the answer's key.
OIP_OUTPUTS = (("digit", "INT64", "digit"), ("probability", "FP32", "probability"),
               ("probabilities", "FP32", "probabilities"))


def load_weights(path: Path) -> tuple[DigitCNN, str]:
    """DigitCNN (eager) with the weights of a ``.mar`` (and its version) or of a state_dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no model at {path}: run `digitserve archive` (notebook 02) for the .mar, or "
            "`digitserve train` (notebook 01) for the weights."
        )
    version = MODEL_VERSION
    if path.suffix == ".mar":
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            source = io.BytesIO(archive.read(manifest["model"]["serializedFile"]))
        version = manifest["model"].get("modelVersion", version)
    else:
        source = path
    model = DigitCNN()
    model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    return model.eval(), version


class DigitPredictor:
    """Payloads in, the handler's answers out; one bad payload fails alone.

    ``batch_sizes``: the batch sizes to warm the frozen model up for (the largest a server
    batches). ``threads``: torch threads for this process (one per replica on a small machine).
    """

    def __init__(self, weights: Path, batch_sizes: Sequence[int] = (1,), threads: int = 1
                 ) -> None:
        torch.set_num_threads(threads)
        model, self.version = load_weights(weights)
        self.model = for_serving(model, preprocessing.IMAGE_SIZE, batch_sizes=batch_sizes)

    def predict(self, payloads: Sequence[object]) -> list[dict]:
        """One answer per payload (``preprocessing.answer``), or ``{"error", "code": 400}``."""
        digits, answers = {}, {}
        for index, payload in enumerate(payloads):
            try:
                digits[index] = preprocessing.digit_from_payload(payload)
            except preprocessing.InvalidInput as err:
                answers[index] = {"error": str(err), "code": 400}
            except Exception as err:  # noqa: BLE001 - one unreadable payload fails alone
                answers[index] = {"error": f"could not read this request ({type(err).__name__}: "
                                           f"{err})", "code": 400}
        if digits:
            indices = sorted(digits)
            rows = self.probabilities(np.stack([digits[i] for i in indices]))
            for index, row in zip(indices, rows, strict=True):
                answers[index] = preprocessing.answer(row, self.version)
        return [answers[i] for i in range(len(payloads))]

    @torch.inference_mode()
    def probabilities(self, digits: np.ndarray) -> list[list[float]]:
        """Softmax over the model's logits for uint8 digits (N, 28, 28), as the handler does."""
        inputs = preprocessing.to_model_input(torch.from_numpy(digits)).contiguous(
            memory_format=torch.channels_last)
        return F.softmax(self.model(inputs).float(), dim=1).tolist()
