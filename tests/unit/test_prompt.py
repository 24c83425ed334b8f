"""The packed layout's prompt building, as pure functions: labelr parity (FORMATS.md §4b)."""

from __future__ import annotations

import orjson
import pytest

from engine.conversation import render_prompt, user_content

TOKEN = "<|reserved_special_token_0|>"
# keys deliberately out of sorted order, and text orjson keeps as UTF-8
SCHEMA = {
    "type": "object",
    "required": ["prix"],
    "properties": {"prix": {"type": "number"}, "devise": {"enum": ["€"]}},
}
INSTRUCTIONS = "Extract the price tag — prix en €.\nAnswer {json_schema} literally if unsure."


def labelr_full_instructions(instructions: str, json_schema: dict) -> str:
    """labelr's train-unsloth `get_full_instructions`, as FORMATS.md §4b quotes it."""
    return (
        f"{instructions}\n\nResponse must be formatted as JSON, and follow this JSON schema:\n"
        f"{orjson.dumps(json_schema).decode()}"
    )


def test_json_schema_template_is_labelrs_byte_for_byte():
    got = render_prompt("json-schema", INSTRUCTIONS, SCHEMA)
    assert got.encode() == labelr_full_instructions(INSTRUCTIONS, SCHEMA).encode()
    assert '{"type":"object","required":["prix"]' in got, "key order of the config, not sorted"


def test_plain_template_is_the_instructions():
    assert render_prompt("plain", INSTRUCTIONS, SCHEMA) == INSTRUCTIONS


def test_custom_template_fills_both_placeholders():
    assert render_prompt("Q: {instructions} S: {json_schema}", "x", {"a": 1}) == 'Q: x S: {"a":1}'


@pytest.mark.parametrize(
    ("position", "want"),
    [("after", "Describe the image:\n" + TOKEN * 2), ("before", TOKEN * 2 + "\nDescribe the image:")],
)
def test_attachment_position(position, want):
    assert user_content("Describe the image:", TOKEN, num_images=2, position=position) == want


def test_attachment_goes_after_the_text_by_default():
    assert user_content("Describe the image:", TOKEN) == "Describe the image:\n" + TOKEN


def test_a_placeholder_inside_the_instructions_stays_text():
    assert render_prompt("<{instructions}>", "see {json_schema}", {"a": 1}) == "<see {json_schema}>"
