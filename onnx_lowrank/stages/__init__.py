"""The pipeline's stages, in the order `tests/test_layout.py` keeps: discover ... allocate, apply, verify, judge, report, search."""
