"""uda.export: the ONNX file computes the PyTorch model's inference features, at any batch size."""
import json

import numpy as np
import pytest
import torch

import uda
from uda import export
from uda.data.images import read_image
from uda.datasets import load_dataset

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_features_equal_pytorchs_on_real_looking_images(source_model, synth_root, tmp_path):
    out = tmp_path / "model.onnx"
    record = export.main(["--model", str(source_model), "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text()) == record
    assert (record["height"], record["width"], record["feature_dim"]) == (64, 32, 128)
    assert export.written_opset(out) == record["opset"] == 18  # the record says what the file declares
    paths = [r.path for r in load_dataset("synth_duke", synth_root, synth_preset="tiny").query[:7]]
    extractor = uda.load_model(source_model, device="cpu")
    expected = extractor(paths).numpy()
    images = torch.stack([extractor.transform(read_image(p)) for p in paths])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # the batch axis is dynamic
        (got,) = session.run(["features"], {"images": batch.numpy()})
        assert got.shape == (len(batch), 128)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4)


def test_multi_scale_models_export_their_scales_inside_the_graph(source_model, synth_root, tmp_path):
    saved = torch.load(source_model, weights_only=True)
    saved["config"]["eval"]["scales"] = [0.5, 1.0]  # as a run evaluated at two scales saves it
    multi_scale = tmp_path / "multi_scale.pth"
    torch.save(saved, multi_scale)
    out = tmp_path / "multi_scale.onnx"
    record = export.main(["--model", str(multi_scale), "--out", str(out)])
    assert record["scales"] == [0.5, 1.0]
    paths = [r.path for r in load_dataset("synth_duke", synth_root, synth_preset="tiny").query[:5]]
    extractor = uda.load_model(multi_scale, device="cpu")
    images = torch.stack([extractor.transform(read_image(p)) for p in paths])
    (got,) = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["features"], {"images": images.numpy()})
    np.testing.assert_allclose(got, extractor(paths).numpy(), atol=1e-4)


def test_an_opset_the_exporter_did_not_write_is_an_error_not_a_wrong_record(source_model, tmp_path, monkeypatch):
    """torch's converter gives up on some versions with a logged warning and keeps opset 18: the file and
    a record claiming the version asked for must not both survive that."""
    from uda.errors import UdaError

    monkeypatch.setattr(export, "written_opset", lambda path: 18)  # as when the down-conversion failed
    out = tmp_path / "model.onnx"
    with pytest.raises(UdaError, match="could not write opset 17 \\(it wrote 18, now removed\\); use --opset 18"):
        export.export_onnx(source_model, out, opset=17)
    assert not out.exists() and not out.with_suffix(".json").exists()
