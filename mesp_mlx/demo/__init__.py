"""The bundled offline demo: a small pretrained Qwen2 model and two datasets.

    model_path()        -> directory for `mlx_lm.load` (config, weights, tokenizer)
    data_path("task")   -> prompt/completion question answering (fine-tuning task)
    data_path("corpus") -> text corpus the model was pretrained on
See make_data.py (how the data was made), build.py (how the model was made) and
accuracy.py (how many held-out questions a model answers, with and without adapters).
"""

from pathlib import Path

_HERE = Path(__file__).parent
DATASETS = ("task", "corpus", "preference")


def model_path() -> str:
    """Directory holding config.json, model.safetensors and tokenizer files."""
    path = _HERE / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"demo model missing in {path}; rebuild it with "
                                "`python -m mesp_mlx.demo.build`")
    return str(path)


def data_path(name: str = "task") -> str:
    """Directory with train/valid/test.jsonl of the named demo dataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; choose from {', '.join(DATASETS)}")
    path = _HERE / "data" / name
    if not (path / "train.jsonl").exists():
        raise FileNotFoundError(f"demo data missing in {path}; regenerate it with "
                                "`python -m mesp_mlx.demo.make_data`")
    return str(path)
