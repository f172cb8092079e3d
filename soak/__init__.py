"""Soak test: many concurrent clients for a while against the stack as processes.

``python -m soak`` (``make soak``) starts the five services and the offline model as
separate processes, runs a mix of runs from N client tasks for T seconds and reports
runs completed, errors by code, latency, shed and timed-out calls, lost runs and each
service's memory over time. ``tests/soak`` runs a short one in ``make test``.
"""
