"""cache: key/value results with TTL, tags and stats (``trellis.cache.v1.CacheService``).

``store`` is the gRPC-free core; ``servicer`` translates protos to it; ``service``
wires both into a server.
"""
