"""protos: protos/ is TorchServe's own, and the committed stubs are generated from it."""

from __future__ import annotations

import pytest

from digitserve import protos
from digitserve.config import PROTOS_DIR

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", protos.PROTO_FILES)
def test_protos_are_byte_identical_to_the_torchserve_jar(name):
    shipped = protos.jar_proto(name)
    assert shipped.startswith(b"syntax") or b"syntax" in shipped[:2000]
    assert (PROTOS_DIR / name).read_bytes() == shipped


def test_no_other_protos():
    assert sorted(p.name for p in PROTOS_DIR.glob("*.proto")) == sorted(protos.PROTO_FILES)


def test_committed_stubs_are_what_generate_stubs_writes(tmp_path):
    written = protos.generate_stubs(out=tmp_path)
    names = sorted(path.name for path in written)
    assert names == sorted(
        f"{stem}{suffix}"
        for stem in (name.removesuffix(".proto") for name in protos.PROTO_FILES)
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    generated = sorted(path.name for path in tmp_path.iterdir())
    committed = sorted(p.name for p in protos.STUBS_DIR.iterdir() if p.name != "__pycache__")
    assert committed == generated
    stale = [name for name in generated
             if (tmp_path / name).read_bytes() != (protos.STUBS_DIR / name).read_bytes()]
    assert stale == [], f"stale stubs: {stale}; run `digitserve protos`"


def test_stubs_import_each_other_inside_the_package():
    from digitserve.grpc_stubs import inference_pb2, inference_pb2_grpc

    source = (protos.STUBS_DIR / "inference_pb2_grpc.py").read_text()
    assert "from digitserve.grpc_stubs import inference_pb2" in source
    assert inference_pb2_grpc.InferenceAPIsServiceStub
    request = inference_pb2.PredictionsRequest(model_name="m", input={"data": b"x"})
    assert request.input["data"] == b"x"
