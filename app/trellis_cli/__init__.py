"""The ``trellis`` command line: demo (embedded stack), run, up."""
