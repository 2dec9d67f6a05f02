"""onnx-lowrank: compress ONNX models after export by grouped low-rank factorization under one global budget."""

__version__ = "0.1.0"
