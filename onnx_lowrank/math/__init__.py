"""The math on numpy arrays (numpy and scipy only, no onnx: a test enforces it): SVD, projection, elimination."""
