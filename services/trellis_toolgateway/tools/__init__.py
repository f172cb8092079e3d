"""Tools the gateway can run: the ``Tool`` abstraction (``base``) and the builtins.

``arithmetic`` (safe expression evaluator), ``command`` (``run_command``, allow-listed
system commands), ``basic`` (``sleep``, ``echo``). Later backends (YAML-registered
shell/http/MCP/gRPC tools) implement the same ``Tool`` interface.
"""

from trellis_toolgateway.tools.base import FunctionTool, Json, Spec, Tool, ToolError

__all__ = ["FunctionTool", "Json", "Spec", "Tool", "ToolError"]
