"""Trellis offline rules model: a deterministic, RULE-BASED OpenAI-compatible server.

It is not an LLM, and not a sixth Trellis service: it is a development tool (hence
``app/``, beside the CLI) so the demo, the embedded stack, compose without a key and the
tests run the real ``openai`` client path (HTTP, SSE streaming, usage, retries) with no
network and no weights. It understands exactly the prompts Trellis's planner writes:

- ``prompt``    the sections ("## Tools", "## Goal", "## Outcomes") both sides agree on
- ``planning``  goal + tool catalog -> a plan as JSON Lines, by keyword rules
- ``answering`` goal + outcomes -> a short deterministic answer
- ``generating`` model tools' structured output (one answer per item of a batch) and
                the embeddings' vectors, made up by rules
- ``tokens``    the deterministic tokenizer used for usage and stream pieces
- ``behaviour`` what to do instead of the rules for one request, on cue (raw text, HTTP
                errors, stalls, a broken stream); tests queue them (tests/support/model_script.py)
- ``server``    the aiohttp app and ``start_offline_model`` for embedding
"""
