"""Chat templates per member.

The harness renders a chat into one context string through `lm.apply_chat_template`, but each
member must see the messages in its own template. So the ensemble's `apply_chat_template` returns
the messages themselves, serialised behind a marker, and each member renders them when the
request reaches it.
"""

from __future__ import annotations

import json

_MARKER = "\x00rlae-chat\x00"


def encode_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    return _MARKER + json.dumps({"messages": messages, "add_generation_prompt": add_generation_prompt})


def render(lm, context: str) -> str:
    """The context as member `lm` (an HFLM) sees it: its own chat template applied if needed."""
    if not context.startswith(_MARKER):
        return context
    chat = json.loads(context[len(_MARKER) :])
    return lm.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
