"""Rules of the contract types that their protos cannot express, shared by the services
that produce and consume them: references from a ToolCall's args to earlier outputs
(``refs``). Identifier and input rules are a cross-cutting edge check
(``trellis.runtime.validation``)."""
