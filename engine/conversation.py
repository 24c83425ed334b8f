"""Pure text building for the packed trainer layout: the user prompt and the conversation turns."""

from __future__ import annotations

import re
from typing import Any

import orjson

_PLACEHOLDER = re.compile(r"\{(instructions|json_schema)\}")
SCHEMA_SENTENCE = "Response must be formatted as JSON, and follow this JSON schema:"
PROMPT_TEMPLATES = {
    "plain": "{instructions}",
    # labelr's get_full_instructions: instructions, a blank line, the sentence, the compact schema
    "json-schema": "{instructions}\n\n" + SCHEMA_SENTENCE + "\n{json_schema}",
}


def render_prompt(template: str, instructions: str, json_schema: dict[str, Any]) -> str:
    """``template`` is a preset name (``plain``, ``json-schema``) or a string with ``{instructions}``
    and/or ``{json_schema}`` placeholders."""
    values = {
        "instructions": instructions,
        "json_schema": orjson.dumps(json_schema).decode(),
    }  # compact, the config's key order, as labelr's
    # one pass, so a placeholder written inside the instructions stays text
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], PROMPT_TEMPLATES.get(template, template))


def user_content(prompt: str, attachment_token: str, num_images: int = 1, position: str = "after") -> str:
    """The prompt, a newline, then the attachment placeholders (one per image), as labelr's trainer
    puts the text before the image; ``position="before"`` puts the placeholders first."""
    tokens = attachment_token * num_images
    return prompt + "\n" + tokens if position == "after" else tokens + "\n" + prompt


def build_conversation(user: str, output: str, system_prompt: str | None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def count_attachments(turns: Any, text: str | None, token: str) -> int:
    if text is not None:
        return text.count(token)
    return sum(t["content"].count(token) for t in turns)
