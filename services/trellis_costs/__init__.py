"""costs: prices, usage ledger, budgets, reports (``trellis.costs.v1.CostAccountingService``).

``prices`` and ``ledger`` are the gRPC-free core; ``servicer`` translates protos to
them; ``service`` wires both into a server.
"""
