"""tool-gateway: tools behind contracts and caches (``trellis.toolgateway.v1.ToolGatewayService``).

``tools`` holds the ``Tool`` abstraction and the backends, ``registry`` the set of
tools a gateway serves (and the holder that swaps it), ``loader`` builds it from the
tools file (``tools.yaml`` is the bundled default), ``reload`` follows edits of that
file, ``invoker`` the gRPC-free core that validates, caches,
bounds and traces one call; ``servicer`` translates protos to it; ``service`` wires
everything into a server.
"""
