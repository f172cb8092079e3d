"""Tools files for stacks under test: the bundled tools plus model tools.

The bundled file's paths are relative to it (``sandbox_root: sandbox``), so a copy gets a
``sandbox`` directory beside it.
"""

from __future__ import annotations

from pathlib import Path

from trellis_toolgateway.loader import BUNDLED_TOOLS_FILE

#: A deterministic summariser (structured output) and a batched one, both model tools.
MODEL_TOOLS = """
  - name: summarize
    kind: model
    description: Summarise a text in one sentence, and count its words.
    input_schema: &text
      type: object
      properties: {text: {type: string}}
      required: [text]
    output_schema: &summary
      type: object
      properties: {summary: {type: string}, words: {type: integer}}
      required: [summary, words]
      additionalProperties: false
    prompt:
      - {role: system, content: "Summarise the user's text in one sentence."}
      - {role: user, content: "{text}"}
    temperature: 0
  - name: summarize_many
    kind: model
    input_schema: *text
    output_schema: *summary
    prompt:
      - {role: system, content: "Summarise the user's text in one sentence."}
      - {role: user, content: "{text}"}
    batch: {max_items: 8, max_wait_ms: 50}
"""


def with_model_tools(directory: Path, extra: str = MODEL_TOOLS) -> Path:
    """A copy of the bundled tools file in ``directory`` with ``extra`` tools appended."""
    (directory / "sandbox").mkdir(exist_ok=True)
    path = directory / "tools.yaml"
    path.write_text(BUNDLED_TOOLS_FILE.read_text() + extra)
    return path
