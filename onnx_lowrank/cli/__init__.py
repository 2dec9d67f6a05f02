"""The command line (`main`), a thin layer over the Python API, with the terminal rendering and plots."""
