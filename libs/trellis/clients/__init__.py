"""Typed async clients of the Trellis services: one home for every onward call.

Each client takes a channel from ``trellis.runtime.channels.Channels``, calls with a
default ``timeout=`` (the channel's interceptor shortens it to the incoming deadline)
and turns RPC errors into ``trellis.runtime.errors`` exceptions.
"""
