"""ONNX in and out, with no compression knowledge: loading and saving, sessions, constants, walking subgraphs."""
