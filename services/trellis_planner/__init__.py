"""planner: model calls that plan a run and join its outcomes (``trellis.planner.v1``).

The core knows nothing of gRPC: ``prompts`` writes the model's messages, ``model`` makes
one traced, deadline-bound, streamed call through the ``openai`` client, ``jsonl`` and
``validation`` turn the streamed plan into checked ToolCalls one line at a time,
``usage`` records what each call cost, and ``core.Planner`` ties them together.
``servicer`` translates protos to the core; ``service`` wires both into a server.
"""
