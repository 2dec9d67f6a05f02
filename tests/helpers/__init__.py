"""What the tests share, imported by module (`from helpers.builders import build_cnn`); tests/conftest.py holds the
fixtures only.

- builders: small deterministic models (build_cnn, build_matmul, build_gemm, ...), make_model, tensor, weights and
  model edits (to_constant_nodes, with_outputs, initializer_arrays)
- files: save, save_external (weights as external data), sha256
- running: run (a model in onnxruntime), assert_same_outputs, run_cli (the command line in-process)
- rewrites: full_rank (every layer factorized at full rank through the real passes)
- strategies: hypothesis strategies: conv_graphs, gemm_graphs, matmul_graphs (one layer), fuzz_models, corruptions
- timers: ScriptedTimer (a `stages.timing.Timer` whose times are a function of the model alone)
"""
