"""tool-gateway: tools behind contracts and caches (``trellis.toolgateway.v1.ToolGatewayService``).

``tools`` holds the ``Tool`` abstraction and the builtin tools, ``registry`` the set
of tools a gateway serves, ``invoker`` the gRPC-free core that validates, caches,
bounds and traces one call; ``servicer`` translates protos to it; ``service`` wires
everything into a server.
"""
