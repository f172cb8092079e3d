"""Tools the gateway can run: the ``Tool`` abstraction (``base``) and every backend.

``config`` is the typed model of the tools file. Builtins: ``arithmetic`` (safe
expression evaluator), ``files`` (``read_file``/``list_dir`` inside the ``sandbox``),
``sql`` (read-only ``sql_query`` over SQLite), ``basic`` (``sleep``, ``echo``). Declared
backends: ``command`` (allow-listed command templates, e.g. ``run_command``), ``http``
(declarative HTTP endpoints). Sources discovered at load: ``mcp_source``, ``grpc_source``.
All implement the same ``Tool`` interface.
"""

from trellis_toolgateway.tools.base import FunctionTool, Json, Spec, Tool, ToolError

__all__ = ["FunctionTool", "Json", "Spec", "Tool", "ToolError"]
