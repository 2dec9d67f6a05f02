"""Op families: one module per op type (`conv`, `gemm`, `matmul`) behind `base.OpFamily`, registered here."""

from onnx_lowrank.ops.base import register
from onnx_lowrank.ops.conv import ConvFamily
from onnx_lowrank.ops.gemm import GemmFamily
from onnx_lowrank.ops.matmul import MatMulFamily

for _family in (ConvFamily(), GemmFamily(), MatMulFamily()):
    register(_family)
