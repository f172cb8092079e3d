"""executor: the front door (``trellis.executor.v1.ExecutorService``).

Core modules know nothing of gRPC: ``refs`` (argument references), ``plan``
(validation of explicit and streamed plans), ``scheduler`` (dispatch-as-ready DAG
execution), ``store`` (run state in SQLite), ``runner`` (one run from budget check
to answer). ``servicer`` translates RPCs to the runner; ``service`` wires it all.
The core speaks the contract's message types (ToolCall, NodeOutcome, RunResponse)
as plain data: they are the run's events, so a second event model would only copy them.
"""
