"""Trellis benchmarks: ``make bench`` (``python -m bench``) writes ``bench/results/latest.json``.

Each benchmark module measures through real gRPC servers started in-process on port 0
and contributes named sections to the results file, merged into what is already
there so benchmarks added later keep each other's figures.
"""
