"""planner: model calls that plan a run and join its outcomes (``trellis.planner.v1``).

The core knows nothing of gRPC: ``formats`` picks the run's plan format, ``prompts``
writes every message the model sees, ``plan_schema`` the plan's JSON Schema and the
tools as functions, ``model`` makes one traced, deadline-bound, streamed call through the
``openai`` client (``breaker`` skips a model that keeps failing), the readers
(``candidates``/``jsonl``, ``json_plan``, ``tool_stream``) and ``validation`` turn the
streamed plan into checked ToolCalls one node at a time, ``model_usage`` records what
each call cost, and ``core.Planner`` ties them together.
``servicer`` translates protos to the core; ``service`` wires both into a server.
"""
