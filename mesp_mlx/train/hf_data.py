"""mlx-lm's `hf_dataset` YAML key: Hugging Face datasets by split expression.

    hf_dataset:                       # a mapping, or a list of them (concatenated)
      path: billsum                   # (`name` too, as mlx-lm's example writes it)
      train_split: "train[:1000]"     # default train[:80%]
      valid_split: "train[-100:]"     # default train[-10%:]
      test_split: test                # needed for --test
      config: {}                      # extra datasets.load_dataset kwargs
      prompt_feature: text            # record keys, as in mlx-lm
      completion_feature: summary

Both loaders return data.read_splits' form ({split: (records, format, lines, name)}),
so tokenizing and batching are the same as for jsonl files: `from_spec` reads the
`hf_dataset` mapping, `from_id` a dataset id given as --data.
"""

from typing import Optional

from ..errors import ConfigError, DataError
from .records import check_record, feature_renames, rename_keys

FEATURES = ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
KEYS = ("path", "name", "train_split", "valid_split", "test_split", "config",
        "mask_prompt") + FEATURES
PREFERENCE = ("system_feature", "chosen_feature", "rejected_feature",
              "preference_score_feature")
DEFAULT_SPLITS = {"train": "train[:80%]", "valid": "train[-10%:]"}


def _entries(spec) -> list:
    return [spec] if isinstance(spec, dict) else list(spec)


def check_spec(spec) -> None:
    """ConfigError naming the key on a malformed hf_dataset."""
    for i, d in enumerate(_entries(spec)):
        where = "hf_dataset" + (f"[{i}]" if isinstance(spec, list) else "")
        pref = sorted(k for k in d if k in PREFERENCE)
        if pref:
            raise ConfigError(f"{where}: {', '.join(pref)} are mlx-lm-lora's "
                              "preference features; here --train-mode dpo/orpo reads "
                              "records with the keys prompt, chosen and rejected")
        extra = sorted(str(k) for k in d if k not in KEYS)
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known: "
                              f"{', '.join(KEYS)}")
        if not isinstance(d.get("path", d.get("name")), str):
            raise ConfigError(f"{where} needs `path`: the dataset id (e.g. billsum)")
        for k in [k for k in d if k.endswith(("_split", "_feature"))]:
            if not isinstance(d[k], str):
                raise ConfigError(f"{where}.{k} must be a string, got {d[k]!r}")
        if "config" in d and not isinstance(d["config"], dict):
            raise ConfigError(f"{where}.config must be a mapping of "
                              "datasets.load_dataset keyword arguments")


def from_spec(spec, need=("train",), top_features: Optional[dict] = None) -> dict:
    """{split: (records, fmt, None, name)} for the splits in `need` (+ test if
    a test_split is given); entries are concatenated split by split."""
    check_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError("hf_dataset needs the Hugging Face `datasets` package: "
                        "`pip install datasets` (or export the splits to "
                        "train/valid/test.jsonl and pass --data DIR)") from None
    out = {}
    for d in _entries(spec):
        path = d.get("path", d.get("name"))
        feats = {**(top_features or {}), **{k: d[k] for k in FEATURES if k in d}}
        rename = feature_renames(*(feats.get(k) for k in FEATURES))
        splits = {**DEFAULT_SPLITS, **{s: d[f"{s}_split"] for s in ("train", "valid",
                                                                    "test")
                                      if f"{s}_split" in d}}
        for split in ("train", "valid", "test"):
            if split not in need and not (split == "valid" and "train" in need):
                continue
            if split not in splits:
                raise DataError(f"hf_dataset {path}: --test needs test_split")
            try:
                ds = datasets.load_dataset(path, split=splits[split],
                                           **d.get("config", {}))
            except Exception as e:  # network, missing split: all end the run the same
                raise DataError(f"could not load Hugging Face dataset {path!r} split "
                                f"{splits[split]!r}: {e}") from None
            name = f"{path}[{splits[split]}]"
            records = [rename_keys(dict(r), rename) for r in ds]
            if not records:
                if split == "valid":
                    continue
                raise DataError(f"hf_dataset {name} is empty")
            prev = out.get(split)
            fmt = prev[1] if prev else None
            for i, rec in enumerate(records):
                fmt = check_record(rec, f"{name}:{i + 1}", fmt)
            if prev is None:
                out[split] = (records, fmt, None, name)
            else:
                out[split] = (prev[0] + records, fmt, None, f"{prev[3]}+{name}")
    return out


def from_id(data_id: str, need, rename=None) -> dict:
    """--data <dataset id>: its train / valid (or validation) / test splits."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{data_id} is not a local directory, and loading a Hugging "
                        "Face dataset needs `pip install datasets`") from None
    try:
        dsd = datasets.load_dataset(data_id)
    except Exception as e:  # network, missing, format: all end the run the same way
        raise DataError(f"could not load Hugging Face dataset {data_id!r}: {e}") from None
    names = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
    out = {}
    for split, cands in names.items():
        hit = next((c for c in cands if c in dsd), None)
        if hit is None:
            if split in need:
                raise DataError(f"dataset {data_id} has no {split!r} split "
                                f"(it has {', '.join(dsd)})")
            continue
        records, fmt = [rename_keys(r, rename) for r in dsd[hit]], None
        where = f"{data_id}[{hit}]"
        for i, rec in enumerate(records):
            fmt = check_record(rec, f"{where}:{i + 1}", fmt)
        out[split] = (records, fmt, None, where)
    return out
