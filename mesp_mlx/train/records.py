"""The record formats of mlx-lm's data (one JSON object per line), checked one by one.

    {"text": ...}                                   text
    {"prompt": ..., "completion": ...}              completions
    {"messages": [{"role": ..., "content": ...}]}   chat
    {"prompt": ..., "chosen": ..., "rejected": ...} preference (--train-mode dpo/orpo)
`check_record` names the file and line of a malformed record; `rename_keys` applies
mlx-lm's *_feature options (other key names for the same formats); `pair_turns`
reads a preference record's forms (mlx-lm-lora's and TRL's) as message lists.
"""

from typing import Optional

from ..errors import DataError

FORMATS = {"completions": ("prompt", "completion"), "chat": ("messages",),
           "text": ("text",), "preference": ("chosen", "rejected")}
ROLES = ("system", "user", "assistant", "tool", "developer")   # chat templates' roles
EXPECTED = ('one JSON object per line: {"text": ...}, {"prompt": ..., '
            '"completion": ...} or {"messages": [{"role": ..., "content": ...}]} '
            '(--train-mode dpo/orpo: {"prompt": ..., "chosen": ..., "rejected": ...})')


def format_of(rec: dict) -> Optional[str]:
    for fmt, keys in FORMATS.items():
        if all(k in rec for k in keys):
            return fmt
    return None


def check_record(rec, where: str, want: Optional[str]) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: got a JSON {type(rec).__name__}; expected {EXPECTED}")
    fmt = format_of(rec)
    if fmt is None and ("chosen" in rec or "rejected" in rec):
        raise DataError(f"{where}: a preference record needs both 'chosen' and "
                        f"'rejected'; this one has no "
                        f"{'rejected' if 'chosen' in rec else 'chosen'!r}")
    if fmt is None:
        raise DataError(f"{where}: unrecognised record with keys {sorted(rec)}; "
                        f"expected {EXPECTED}")
    if want is not None and fmt != want:
        raise DataError(f"{where}: a {fmt!r} record in a {want!r} file; every line "
                        f"must have the keys {list(FORMATS[want])}")
    try:
        if fmt == "chat":
            _messages(rec["messages"], "messages")
        elif fmt == "preference":
            pair_turns(rec)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if fmt not in ("chat", "preference"):
        for k in FORMATS[fmt]:
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got "
                                f"{type(rec[k]).__name__}")
    return fmt


def _messages(msgs, key: str) -> list:
    """msgs, checked as a non-empty list of chat messages (ValueError)."""
    if (not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
        raise ValueError(f"{key!r} must be a non-empty list of "
                         '{"role": ..., "content": ...} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise ValueError(f"message {i + 1} has role {m['role']!r}; "
                             f"roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i + 1}'s content must be a string, "
                             f"got {type(m['content']).__name__}")
    return msgs


def _side(v, key: str) -> list:
    """A preference side as messages: a string is one assistant turn."""
    if isinstance(v, str):
        return [{"role": "assistant", "content": v}]
    if isinstance(v, dict) and "messages" in v:            # mlx-lm-lora's ORPO form
        v = v["messages"]
    if not isinstance(v, list):
        raise ValueError(f"{key!r} must be a string or a list of chat messages, got "
                         f"{type(v).__name__}")
    return _messages(v, key)


def pair_turns(rec: dict) -> tuple:
    """(prompt, chosen, rejected) message lists of a preference record (ValueError).
    With a "prompt" (a string: one user turn; or messages) each side is the
    completion (a string: one assistant turn; or messages); without one, each side
    is the whole conversation and the prompt is every turn but the last, shared."""
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    head = [{"role": "system", "content": system}] if system else []
    chosen, rejected = _side(rec["chosen"], "chosen"), _side(rec["rejected"], "rejected")
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else \
            _messages(p, "prompt")
        return head + prompt, chosen, rejected
    if isinstance(rec["chosen"], str) or isinstance(rec["rejected"], str):
        raise ValueError("a preference record with string sides needs a 'prompt'")
    if len(chosen) < 2 or len(rejected) < 2:
        raise ValueError("without a 'prompt', 'chosen' and 'rejected' are whole "
                         "conversations: the prompt turns, then the answer")
    differ = [i + 1 for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b]
    if differ or len(chosen) != len(rejected):
        at = differ[0] if differ else min(len(chosen), len(rejected))
        raise ValueError(f"'chosen' and 'rejected' do not share the prompt turns (turn "
                         f"{at} differs): without a 'prompt', the two conversations may "
                         "differ only in their last turn")
    return head + chosen[:-1], chosen[-1:], rejected[-1:]


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
