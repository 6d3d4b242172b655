"""A tiny segmentation package whose answer is known: a real ONNX graph (built with onnx.helper, no
torch, no training) that marks dark blocks as defects, so the edge runtime's handling of frame
sizes (fixed resize, native padding and bucketing, max_side) can be checked value by value.

The graph: ``prob = sigmoid(GAIN * (LEVEL - block_mean(x)))`` where ``block_mean`` is the mean of
each ``stride x stride`` block (AveragePool, then nearest Resize back), so a block of pixels darker
than ``LEVEL`` (0.5 after the 1/255 scale) has a probability near 1 and a bright one near 0. Like a
real net of total stride ``stride``, a frame whose sides are not multiples of it must be padded,
and what the padding holds shows in the last block row and column: zeros make them dark, a mirror
of the frame keeps them as the frame is. Unsigned: swappers and sites using it trust no keys.
Without onnx (the models extra) the tests that build it are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.package import (Manifest, Package, SegmentationPostprocess, SegmentationPreprocess, TensorSpec,
                            write_package)

LEVEL = 0.5
GAIN = 20.0
BRIGHT, DARK = 200, 40
"""Gray levels of a defect-free surface and of a defect: probabilities ~0.004 and ~0.999."""


def dark_block_onnx(stride: int = 4, size: tuple[int, int] | None = None) -> bytes:
    """``image[batch, 1, H, W] -> prob[batch, 1, H, W]``; ``size`` fixes H x W in the graph (None:
    dynamic ``height`` and ``width``), as an export without dynamic spatial axes would."""
    onnx = pytest.importorskip("onnx", reason="the tiny package's graph is built with onnx.helper (models extra)")
    from onnx import TensorProto, helper, numpy_helper

    dims: list[int | str] = ["batch", 1, *(size or ("height", "width"))]
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
             {"scales": [1, 1, stride, stride], "level": LEVEL, "gain": GAIN}.items()]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[stride, stride], strides=[stride, stride]),
        helper.make_node("Resize", ["pooled", "", "scales"], ["block_mean"], mode="nearest"),
        helper.make_node("Sub", ["level", "block_mean"], ["darkness"]),
        helper.make_node("Mul", ["darkness", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
    ]
    graph = helper.make_graph(nodes, "dark_blocks",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_dark_block_package(folder: Path, resize: str = "native", stride: int = 4, height: int = 48,
                             width: int = 64, max_side: int | None = None, dynamic: bool = True,
                             version: str = "1.0.0") -> Package:
    """The package of :func:`dark_block_onnx`: ``native`` (``pad_multiple`` = ``stride``; ``height x
    width`` the reference frame) or ``fixed`` (every frame resized to ``height x width``). With
    ``dynamic=False`` the graph's H x W is fixed at ``height x width`` whatever the manifest says."""
    spatial: list[int | str] = ["height", "width"] if dynamic else [height, width]
    manifest = Manifest(
        name="dark-blocks", version=version, task="segmentation",
        inputs=[TensorSpec(name="image", shape=["batch", 1, *spatial])],
        outputs=[TensorSpec(name="prob", shape=["batch", 1, *spatial])],
        preprocess=SegmentationPreprocess(height=height, width=width, resize=resize, pad_multiple=stride,
                                          max_side=max_side),
        postprocess=SegmentationPostprocess(threshold=0.5),
    )
    return write_package(folder, manifest, dark_block_onnx(stride, None if dynamic else (height, width)))


def surface(height: int, width: int, dark: tuple[slice, slice] | None = None, color: bool = False) -> np.ndarray:
    """A bright frame (gray, or BGR with ``color``) with one dark rectangle where ``dark`` says."""
    image = np.full((height, width), BRIGHT, np.uint8)
    if dark is not None:
        image[dark] = DARK
    return np.repeat(image[..., None], 3, axis=2) if color else image
