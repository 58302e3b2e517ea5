"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import ast
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from .errors import UserError


def parse_kwargs(items: Optional[Union[Sequence[str], Mapping[str, Any]]]) -> Dict[str, Any]:
    """``['k=v', ...]`` as timm's ``--model-kwargs`` reads them: values are Python literals, else strings.

    A mapping passes through, so programmatic callers can hand over a dict.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"model kwarg {item!r} is not key=value; fix: write e.g. --model-kwargs lift_dim=320")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value  # plain strings need no quotes, as in timm's train.py
    return out


def hub_offline() -> bool:
    """Is the Hugging Face Hub offline? Its own flag, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set now.

    The environment is read again because the hub reads it once, at import, and users (and tests) set it later.
    """
    from huggingface_hub import constants

    # is_offline_mode() appeared in huggingface_hub 1.x; older releases only have the constant
    is_offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(is_offline()) or env.strip().upper() in ("1", "ON", "YES", "TRUE")
