"""A tiny anomaly package for any channel names: a real ONNX LSTM step graph (random weights, built
with onnx.helper) and a manifest, so that config, sources and agents can be tested on sensor sets
other than SKAB's without training. Unsigned: sites using it set ``signatures.require: false``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.package import AnomalyPostprocess, AnomalyPreprocess, Manifest, Package, TensorSpec, write_package


def lstm_step_onnx(channels: int, hidden: int, seed: int = 0) -> bytes:
    """``(x[batch, C], h[1, batch, H], c[1, batch, H]) -> (y[batch, C], h_out, c_out)``: one LSTM step and a
    linear head forecasting the next (normalised) difference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.normal(0, 0.3, (1, 4 * hidden, channels)), "R": rng.normal(0, 0.3, (1, 4 * hidden, hidden)),
        "B": np.zeros((1, 8 * hidden)), "head": rng.normal(0, 0.1, (hidden, channels)), "bias": np.zeros(channels),
        "axis0": np.array([0], np.int64),
    }
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "axis0" else np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis0"], ["seq"]),
        helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h", "c"], ["", "h_out", "c_out"], hidden_size=hidden),
        helper.make_node("Squeeze", ["h_out", "axis0"], ["last"]),
        helper.make_node("MatMul", ["last", "head"], ["proj"]),
        helper.make_node("Add", ["proj", "bias"], ["y"]),
    ]
    state = ["1", "batch", hidden]
    graph = helper.make_graph(
        nodes, "tiny_lstm_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, state)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("c_out", TensorProto.FLOAT, state)],
        inits,
    )
    graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1  # num_directions, fixed
    graph.input[2].type.tensor_type.shape.dim[0].dim_value = 1
    graph.output[1].type.tensor_type.shape.dim[0].dim_value = 1
    graph.output[2].type.tensor_type.shape.dim[0].dim_value = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_manifest(channels: Sequence[str], hidden: int = 4, name: str = "tiny",
                  calibration_steps: int = 20) -> Manifest:
    """The manifest of :func:`write_tiny_anomaly_package` (alone, it is all ``config check`` reads)."""
    n = len(channels)
    state = TensorSpec(name="h", shape=[1, "batch", hidden])
    return Manifest(
        name=name, version="1", task="anomaly",
        inputs=[TensorSpec(name="x", shape=["batch", n]), state, state.model_copy(update={"name": "c"})],
        outputs=[TensorSpec(name="y", shape=["batch", n]), state.model_copy(update={"name": "h_out"}),
                 state.model_copy(update={"name": "c_out"})],
        preprocess=AnomalyPreprocess(kind="anomaly", channels=list(channels), mean=[0.0] * n, std=[1.0] * n,
                                     hidden_size=hidden, num_layers=1, difference=True),
        postprocess=AnomalyPostprocess(kind="anomaly", residual_scale=[1.0] * n, threshold=1.0,
                                       calibration_steps=calibration_steps, warmup_steps=2),
    )


def write_tiny_anomaly_package(folder: Path, channels: Sequence[str], hidden: int = 4, name: str = "tiny",
                               calibration_steps: int = 20) -> Package:
    """A package folder for ``channels``; each group calibrates on its first ``calibration_steps`` samples."""
    manifest = tiny_manifest(channels, hidden, name, calibration_steps)
    return write_package(folder, manifest, lstm_step_onnx(len(channels), hidden))
