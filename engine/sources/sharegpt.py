"""LLaVA / ShareGPT / OpenAI-messages turns -> the packed trainer's ``{role, content}`` turns.

Pure: a sample's dict in, its turns (with each ``<image>`` token or image part replaced by the
attachment token) and its image locations out, or a reason why the sample cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"  # LLaVA's and LLaMA-Factory's placeholder (IMAGE_PLACEHOLDER)
# LLaMA-Factory's sharegpt tags (human/gpt/system) and the OpenAI roles they stand for
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True, slots=True)
class Turns:
    turns: tuple[dict[str, str], ...]
    images: tuple[str, ...]  # in the order their tokens stand in the text


def is_sharegpt(obj: Any) -> bool:
    """Whether a sample looks like LLaVA/ShareGPT (``conversations`` of ``from``/``value``) or
    OpenAI-style ``messages``: what detection and the tar reader look for."""
    if not isinstance(obj, dict) or "output" in obj or "modalities" in obj:
        return False
    conv = obj.get("conversations")
    if (
        isinstance(conv, list)
        and conv
        and isinstance(conv[0], dict)
        and "from" in conv[0]
        and "value" in conv[0]
    ):
        return True
    msgs = obj.get("messages")
    return isinstance(msgs, list) and bool(msgs) and isinstance(msgs[0], dict) and "role" in msgs[0]


def sample_images(obj: dict[str, Any]) -> list[str] | str:
    """The sample's ``images`` list, or its one ``image``; a reason when neither is usable."""
    images = obj.get("images", obj.get("image"))
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p and "\x00" not in p for p in images):
        return "'images' must be a list of paths (or 'image' one path)"
    return images


def convert(obj: dict[str, Any], attachment_token: str) -> Turns | str:
    """The sample's turns and images, or a reason. ``<image>`` tokens and ``{"type": "image"}``
    parts become ``attachment_token``; their count must equal the number of images."""
    if "conversations" in obj:
        raw, role_key, content_key = obj["conversations"], "from", "value"
        if isinstance(raw, list) and raw and isinstance(raw[0], dict) and "role" in raw[0]:
            role_key, content_key = "role", "content"  # trainer-style turns under 'conversations'
    elif "messages" in obj:
        raw, role_key, content_key = obj["messages"], "role", "content"
    else:
        return "no 'conversations' or 'messages'"
    if not isinstance(raw, list) or not raw:
        return (
            f"'{'conversations' if 'conversations' in obj else 'messages'}' must be a non-empty list of turns"
        )
    listed = sample_images(obj)
    if isinstance(listed, str):
        return listed
    turns: list[dict[str, str]] = []
    system = obj.get("system")
    if isinstance(system, str) and system:
        turns.append({"role": "system", "content": system})
    images: list[str] = []
    num_tokens = num_own = 0
    queue = iter(listed)  # each token takes the next listed image, unless its part names its own
    for i, turn in enumerate(raw, 1):
        if not isinstance(turn, dict):
            return f"turn {i} is not an object"
        role = ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            return f"turn {i}: unknown role {turn.get(role_key)!r} (expected one of {', '.join(ROLES)})"
        content = turn.get(content_key)
        if isinstance(content, str):
            count = content.count(IMAGE_TOKEN)
            num_tokens += count
            images.extend(p for _, p in zip(range(count), queue))
            text = content.replace(IMAGE_TOKEN, attachment_token)
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content, 1):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    count = part["text"].count(IMAGE_TOKEN)
                    num_tokens += count
                    images.extend(p for _, p in zip(range(count), queue))
                    pieces.append(part["text"].replace(IMAGE_TOKEN, attachment_token))
                elif kind == "image":
                    num_tokens += 1
                    own = next(
                        (part[k] for k in ("image", "url", "path") if isinstance(part.get(k), str)), None
                    )
                    if own is not None:
                        images.append(own)
                        num_own += 1
                    else:
                        images.extend(p for _, p in zip(range(1), queue))
                    pieces.append(attachment_token)
                else:
                    return f"turn {i}, part {j}: expected {{type: text, text}} or {{type: image}}"
            text = "\n".join(pieces)  # as LLaVA writes "<image>\nquestion"
        else:
            return f"turn {i}: '{content_key}' must be a string or a list of parts"
        turns.append({"role": role, "content": text})
    # LLaMA-Factory refuses such a sample when it trains (hiyouga/LLaMA-Factory,
    # src/llamafactory/data/mm_plugin.py, LlavaPlugin.process_messages: "The number of images does
    # not match the number of <image> tokens"); here it is the row's reject instead
    if num_tokens != len(listed) + num_own:
        return (
            f"{num_tokens} {IMAGE_TOKEN} token(s) or image part(s) in the turns but "
            f"{len(listed) + num_own} image(s)"
        )
    return Turns(tuple(turns), tuple(images))
