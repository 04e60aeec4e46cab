"""The record formats of mlx-lm's data (one JSON object per line), checked one by one.

    {"text": ...}                                   text
    {"prompt": ..., "completion": ...}              completions
    {"messages": [{"role": ..., "content": ...}]}   chat
`check_record` names the file and line of a malformed record; `rename_keys` applies
mlx-lm's *_feature options (other key names for the same formats).
"""

from typing import Optional

from ..errors import DataError

FORMATS = {"completions": ("prompt", "completion"), "chat": ("messages",),
           "text": ("text",)}
ROLES = ("system", "user", "assistant", "tool", "developer")   # chat templates' roles
EXPECTED = ('one JSON object per line: {"text": ...}, {"prompt": ..., '
            '"completion": ...} or {"messages": [{"role": ..., "content": ...}]}')


def format_of(rec: dict) -> Optional[str]:
    for fmt, keys in FORMATS.items():
        if all(k in rec for k in keys):
            return fmt
    return None


def check_record(rec, where: str, want: Optional[str]) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: got a JSON {type(rec).__name__}; expected {EXPECTED}")
    fmt = format_of(rec)
    if fmt is None:
        raise DataError(f"{where}: unrecognised record with keys {sorted(rec)}; "
                        f"expected {EXPECTED}")
    if want is not None and fmt != want:
        raise DataError(f"{where}: a {fmt!r} record in a {want!r} file; every line "
                        f"must have the keys {list(FORMATS[want])}")
    if fmt == "chat":
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            '{"role": ..., "content": ...} objects')
        for i, m in enumerate(msgs):
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise DataError(f"{where}: message {i + 1} has role {m['role']!r}; "
                                f"roles are {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i + 1}'s content must be a string, "
                                f"got {type(m['content']).__name__}")
    else:
        for k in FORMATS[fmt]:
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got "
                                f"{type(rec[k]).__name__}")
    return fmt


def rename_keys(rec, rename: Optional[dict]):
    """rec with its keys renamed by `rename` ({"question": "prompt"}: mlx-lm's
    prompt_feature etc.); non-dict records pass through to the format check."""
    if not rename or not isinstance(rec, dict):
        return rec
    return {rename.get(k, k): v for k, v in rec.items()}


def feature_renames(prompt=None, completion=None, text=None, chat=None) -> dict:
    """mlx-lm's *_feature names -> {their key: our key}, for rename_keys."""
    pairs = ((prompt, "prompt"), (completion, "completion"), (text, "text"),
             (chat, "messages"))
    return {k: ours for k, ours in pairs if k and k != ours}
