"""`python -m onnx_lowrank` runs the command line."""

import sys

from onnx_lowrank.cli.main import main

sys.exit(main())
