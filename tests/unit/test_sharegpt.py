"""engine.sources.sharegpt: LLaVA/ShareGPT/messages turns -> trainer turns + images."""

from __future__ import annotations

from engine.sources import sharegpt

TOKEN = "<|reserved_special_token_0|>"


def test_llava_conversations():
    obj = {
        "id": "1",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    got = sharegpt.convert(obj, TOKEN)
    assert got.images == ("coco/1.jpg",)
    assert got.turns == (
        {"role": "user", "content": TOKEN + "\nWhat is it?"},
        {"role": "assistant", "content": "A bus."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
    )


def test_sharegpt_system_and_two_images_in_order():
    obj = {
        "system": "Be brief.",
        "images": ["a.png", "b.png"],
        "conversations": [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "No."}],
    }
    got = sharegpt.convert(obj, "<T>")
    assert got.turns[0] == {"role": "system", "content": "Be brief."}
    assert got.turns[1]["content"] == "<T><T>Same?"
    assert got.images == ("a.png", "b.png")


def test_messages_with_parts():
    obj = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What?"},
                    {"type": "image", "image": "own.jpg"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
        ],
        "images": ["listed.jpg"],
    }
    got = sharegpt.convert(obj, "<T>")
    assert got.turns[0] == {"role": "user", "content": "<T>\nWhat?\n<T>"}
    assert got.turns[1] == {"role": "assistant", "content": "Two cats."}
    assert got.images == ("listed.jpg", "own.jpg")


def test_token_count_must_equal_image_count():
    two_tokens = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
    }
    assert (
        sharegpt.convert(two_tokens, "<T>")
        == "2 <image> token(s) or image part(s) in the turns but 1 image(s)"
    )
    no_token = {
        "images": ["a.jpg"],
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
    }
    assert "0 <image> token(s)" in sharegpt.convert(no_token, "<T>")


def test_text_only_sample_is_kept():
    got = sharegpt.convert(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "<T>"
    )
    assert got.images == () and len(got.turns) == 2


def test_bad_samples_have_reasons():
    assert "unknown role 'bot'" in sharegpt.convert({"conversations": [{"from": "bot", "value": "x"}]}, "<T>")
    assert "non-empty list" in sharegpt.convert({"conversations": []}, "<T>")
    assert "list of paths" in sharegpt.convert(
        {"image": 3, "conversations": [{"from": "human", "value": "x"}]}, "<T>"
    )
    assert "part 1" in sharegpt.convert(
        {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "<T>"
    )


def test_is_sharegpt():
    assert sharegpt.is_sharegpt({"conversations": [{"from": "human", "value": "x"}]})
    assert sharegpt.is_sharegpt({"messages": [{"role": "user", "content": "x"}]})
    assert not sharegpt.is_sharegpt({"conversations": [{"role": "user", "content": "x"}], "modalities": []})
    assert not sharegpt.is_sharegpt({"image_id": "a", "output": "x", "messages": [{"role": "user"}]})
