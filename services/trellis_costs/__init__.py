"""costs: prices, usage ledger, budgets, reports (``trellis.costs.v1.CostAccountingService``).

``prices``, ``ledger`` (SQLite or PostgreSQL) and ``budgets`` (the in-memory budget
view with reservations) are the gRPC-free core; ``servicer`` translates protos to
them; ``service`` wires them into a server.
"""
