"""Values of `--model_args` as the harness hands them over: strings, whatever they stand for."""

from __future__ import annotations

import ast


def parse_list(value) -> list:
    """A list from model_args: a real list (JSON on the command line), or the string `[a,b]`
    that the harness passes for unquoted items."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
            if isinstance(parsed, (list, tuple)):
                return list(parsed)
        except (ValueError, SyntaxError):
            pass
        return [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]
    return [item.strip() for item in text.split(",") if item.strip()]
