"""`python -m mesp_mlx.lora` end to end on the tiny model, and every bad input."""

import json
import re

import pytest
from conftest import sentence, write_jsonl

from mesp_mlx import engine
from mesp_mlx.lora import main

from helpers import base, cli, losses

ISSUE_FLAGS = ("--model", "--train", "--test", "--data", "--iters", "--batch-size",
               "--max-seq-length", "--learning-rate", "--optimizer", "--num-layers",
               "--adapter-path", "--resume-adapter-file", "--steps-per-report",
               "--steps-per-eval", "--steps-per-save", "--val-batches", "--test-batches",
               "--grad-accumulation-steps", "--mask-prompt", "--seed", "--method",
               "--rank", "--scale", "--dropout", "--memory-budget", "--device-profile",
               "--memory-log", "--config")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    rc, out, err = cli(*base(tiny_model_dir, text_data, d / "ad", "--train", "--test",
                             "--iters", 4, "--steps-per-save", 2, "--method", "autodiff",
                             "--optimizer", "adamw", "--memory-log", d / "mem.jsonl"))
    assert rc == 0, err
    return d, out


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    assert "mlx_lm.fuse" in text and "default: mesp" in text


def test_train_writes_mlx_lm_files_and_memory_report(trained):
    d, out = trained
    files = {p.name for p in (d / "ad").iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "0000002_adapters.safetensors",
            "0000004_adapters.safetensors", "state.safetensors", "state.json"} <= files
    cfg = json.loads((d / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["method"] == "autodiff"
    assert cfg["iters"] == 4 and cfg["num_layers"] == 2
    assert "Options saved to" in out and "Options:" not in out   # no dump of every option
    assert re.search(r"Iter 4: train loss [\d.]+, lr 1.000e-02, it/s [\d.]+, tokens/s "
                     r"[\d.]+ processed, [\d.]+ trained, peak [\d.]+ MB", out)
    assert out.count("Iter 1: val loss") == 1 and "Iter 0" not in out and "Test loss" in out and "Memory estimate" in out
    recs = [json.loads(x) for x in (d / "mem.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["mlx_peak"] > 0 for r in recs)


def test_test_only_reloads_adapters(trained, tiny_model_dir, text_data):
    d, out = trained
    rc, out2, err = cli("--model", tiny_model_dir, "--data", text_data, "--test",
                        "--adapter-path", d / "ad", "--batch-size", 4,
                        "--max-seq-length", 128)
    assert rc == 0, err
    test_loss = re.findall(r"Test loss ([\d.]+)", out)
    assert test_loss and re.findall(r"Test loss ([\d.]+)", out2) == test_loss


def test_resume_from_snapshot_reproduces_losses(trained, tiny_model_dir, text_data):
    d, out = trained
    rc, out2, err = cli(*base(tiny_model_dir, text_data, d / "resumed", "--train",
                              "--iters", 4, "--method", "autodiff", "--optimizer", "adamw",
                              "--resume-adapter-file", d / "ad" / "0000002_adapters.safetensors"))
    assert rc == 0, err
    assert "at iteration 2" in out2
    assert losses(out2) == {4: losses(out)[4]}


@pytest.mark.parametrize("method", ["mebp", "mesp"])
def test_train_each_method(tiny_model_dir, completion_data, tmp_path, method):
    if method not in engine.METHODS:
        pytest.skip(f"engine has no {method} yet")
    rc, out, err = cli(*base(tiny_model_dir, completion_data, tmp_path, "--train",
                             "--iters", 2, "--method", method, "--mask-prompt"))
    assert rc == 0, err
    assert 2 in losses(out) and (tmp_path / "adapters.safetensors").is_file()


def test_yaml_config_with_cli_override(tiny_model_dir, text_data, tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {text_data}\ntrain: true\niters: 5\n"
        "batch_size: 4\nmax_seq_length: 128\nmethod: autodiff\nsave_every: 50\n"
        f"adapter_path: {tmp_path / 'ad'}\nlora_parameters: {{rank: 3, scale: 4.0, "
        "dropout: 0.0}\n")
    rc, out, err = cli("--config", tmp_path / "c.yaml", "--iters", 1)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["iters"] == 1 and cfg["steps_per_save"] == 50
    assert cfg["lora_parameters"]["rank"] == 3 and cfg["lora_parameters"]["scale"] == 4.0


def _bad(tmp_path, name, lines):
    d = tmp_path / name
    write_jsonl(d / "train.jsonl", [{"text": sentence(i)} for i in range(4)])
    with open(d / "train.jsonl", "a") as f:
        f.write(lines)
    return d


@pytest.mark.parametrize("case", ["unknown_repo", "missing_dir_model", "missing_data",
                                  "missing_train", "malformed", "budget", "mezo",
                                  "bad_budget", "nothing", "num_layers0", "bad_yaml_key",
                                  "too_long"])
def test_bad_input_is_a_clean_error(case, tiny_model_dir, text_data, tmp_path):
    m, d, a = tiny_model_dir, text_data, tmp_path / "ad"
    (tmp_path / "c.yaml").write_text("iterz: 3\n")
    args, expect = {
        "unknown_repo": (["--model", "nobody/no-such-model", "--data", d, "--train"],
                         r"nobody/no-such-model.*--model <dir>"),
        "missing_dir_model": (["--model", tmp_path / "nomodel", "--data", d, "--train"],
                              r"model directory .*nomodel does not exist"),
        "missing_data": (base(m, tmp_path / "nodata", a, "--train"),
                         r"data directory .*nodata not found"),
        "missing_train": (base(m, write_jsonl(tmp_path / "v" / "valid.jsonl",
                                              [{"text": "a"}]).parent, a, "--train"),
                          r"train.jsonl not found"),
        "malformed": (base(m, _bad(tmp_path, "bad", '{"txt": "typo"}\n'), a, "--train"),
                      r"train.jsonl:5: unrecognised record with keys \['txt'\]; expected"),
        "budget": (base(m, d, a, "--train", "--memory-budget", "1MB"),
                   r"exceeds the budget of 1 MB by \d+ MB"),
        "mezo": (base(m, d, a, "--train", "--method", "mezo", "--grad-accumulation-steps",
                      2), r"--method mezo does not accumulate"),
        "bad_budget": (base(m, d, a, "--train", "--memory-budget", "lots"),
                       r"memory size 'lots'"),
        "nothing": (base(m, d, a), r"nothing to do: pass --train and/or --test"),
        "num_layers0": (base(m, d, a, "--train", "--num-layers", 0), r"--num-layers"),
        "bad_yaml_key": (["--config", tmp_path / "c.yaml", "--train"],
                         r"c.yaml: unknown option\(s\) iterz"),
        "too_long": (base(m, write_jsonl(tmp_path / "long" / "train.jsonl",
                                         [{"text": "a b " * 20000}]).parent, a,
                          "--train", "--max-seq-length", 10**6),
                     r"a sequence of \d+ tokens is longer than the model supports "
                     r"\(max_position_embeddings \d+\); use --max-seq-length"),
    }[case]
    rc, out, err = cli(*args)
    assert rc == 1, (out, err)
    assert re.search(expect, err, re.S), err
    assert "Traceback" not in err + out


def test_over_long_sequences_warn_once_with_count(tiny_model_dir, tmp_path):
    d = tmp_path / "long"
    write_jsonl(d / "train.jsonl", [{"text": sentence(i, 4)} for i in range(6)] +
                [{"text": sentence(i, 40)} for i in range(2)])
    rc, out, err = cli(*base(tiny_model_dir, d, tmp_path / "ad", "--train", "--iters", 1,
                             "--method", "autodiff", "--max-seq-length", 64))
    assert rc == 0, err
    warns = [x for x in out.splitlines() if "truncated" in x]
    assert len(warns) == 1 and "2 of 8 sequences" in warns[0] and "64" in warns[0]


def test_model_names_resolve_to_published_repos():
    from mesp_mlx.models.loading import ModelLoadError, resolve_model_name
    assert resolve_model_name("Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_name("Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_model_name("qwen2.5-1.5b-instruct-4bit") == \
        "mlx-community/Qwen2.5-1.5B-Instruct-4bit"
    assert resolve_model_name("Qwen2.5-0.5B-Instruct-bf16") == \
        "mlx-community/Qwen2.5-0.5B-Instruct-bf16"
    assert resolve_model_name("org/any-model") == "org/any-model"
    with pytest.raises(ModelLoadError, match="Instruct-4bit"):
        resolve_model_name("Qwen2.5-0.5B-4bit")


def test_short_name_offline_error_names_the_repo(tiny_model_dir, text_data):
    rc, out, err = cli("--model", "Qwen2.5-0.5B-Instruct-4bit", "--data", text_data,
                       "--train")
    assert rc == 1 and "Model Qwen2.5-0.5B-Instruct-4bit -> mlx-community/" in out
    assert "mlx-community/Qwen2.5-0.5B-Instruct-4bit" in err and "--model <dir>" in err
    assert "`hf download mlx-community/Qwen2.5-0.5B-Instruct-4bit --local-dir <dir>`" in err
    assert "huggingface-cli" not in err              # huggingface_hub 2.x has no such command


# ---------------------------------------------------------------- bad input

def test_failed_resume_leaves_the_adapter_folder_intact(trained, tiny_model_dir, text_data):
    """A rank mismatch is found before anything is written: adapter_config.json is
    not rewritten (rank 8 over rank-4 weights)."""
    d, _ = trained
    folder = d / "ad"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc, out, err = cli(*base(tiny_model_dir, text_data, folder, "--train", "--iters", 6,
                             "--rank", 8, "--resume-adapter-file", folder))
    assert rc == 1 and "does not match the model's LoRA layers" in err, err
    assert "Traceback" not in out + err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_truncated_resume_file_is_reported_before_loading(tmp_path, text_data):
    f = tmp_path / "adapters.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"x\":")
    rc, out, err = cli("--model", "nobody/no-such-model", "--data", text_data, "--train",
                       "--adapter-path", tmp_path / "out", "--resume-adapter-file", f)
    assert rc == 1 and "not a readable safetensors file" in err and "Traceback" not in err
    assert "no-such-model" not in err and not (tmp_path / "out").exists()


def test_final_save_is_logged_once(trained):
    _, out = trained
    assert len(re.findall(r"[Ss]aved adapters to", out)) == 2      # iteration 2 and the end
    assert len(re.findall(r"^Saved adapters to \S+ and 0000004_adapters", out, re.M)) == 1


def test_memory_log_without_matplotlib_says_how(monkeypatch, tiny_model_dir, text_data,
                                                tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--iters", 1, "--memory-log", tmp_path / "mem.jsonl"))
    assert rc == 0, err
    assert 'No memory plot: matplotlib is not installed: pip install "mesp-mlx[plot]"' in out


def test_offload_checkpoints_same_losses_and_no_leftovers(tiny_model_dir, text_data,
                                                          tmp_path):
    runs = {}
    for name, extra in (("memory", ()), ("disk", ("--offload-checkpoints",
                                                  tmp_path / "ck"))):
        rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / name, "--train",
                                 "--iters", 2, "--method", "mesp", *extra))
        assert rc == 0, err
        runs[name] = losses(out)
    assert runs["disk"] == runs["memory"] and runs["disk"]
    assert list((tmp_path / "ck").iterdir()) == []           # the file went with each step
    rc, _, err = cli(*base(tiny_model_dir, text_data, tmp_path / "z", "--train",
                           "--iters", 1, "--method", "autodiff",
                           "--offload-checkpoints", tmp_path / "ck"))
    assert rc == 1 and "mesp or mebp" in err


def test_memory_budget_picks_an_activation_plan_that_fits(tiny_model_dir, text_data,
                                                           tmp_path):
    """With a budget, training spends the headroom on blocks that skip their
    recompute; the losses stay those of the minimal schedule and the measured MLX
    peak stays within the budget."""
    budget = 400e6
    runs = {}
    for name, extra in (("minimal", ("--activation-plan", "minimal")),
                        ("planned", ("--memory-budget", "400MB"))):
        log = tmp_path / f"{name}.jsonl"
        rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / name, "--train",
                                 "--iters", 3, "--method", "mesp", "--memory-log", log,
                                 *extra))
        assert rc == 0, err
        runs[name] = (losses(out), out, [json.loads(x) for x in log.read_text().split("\n")
                                         if x.strip()])
    assert runs["planned"][0] == pytest.approx(runs["minimal"][0], rel=1e-6)
    plan = re.search(r"activation plan: (\d+) of (\d+) blocks", runs["planned"][1])
    assert plan and int(plan.group(1)) == int(plan.group(2)) > 0, runs["planned"][1]
    assert "activation plan: minimal" in runs["minimal"][1]
    assert max(r["mlx_peak"] for r in runs["planned"][2]) <= budget


def test_pack_trains_the_same_first_loss(tiny_model_dir, text_data, tmp_path):
    """--pack: one batch holding every training example, packed or not, gives the
    same first loss (each example trained as if alone); --pack needs mesp."""
    runs = {}
    for name, extra in (("plain", ()), ("pack", ("--pack",))):
        rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / name, "--train",
                                 "--iters", 1, "--batch-size", 24, *extra))
        assert rc == 0, err
        runs[name] = losses(out)
    assert runs["pack"] == runs["plain"] and 1 in runs["pack"]
    rc, _, err = cli(*base(tiny_model_dir, text_data, tmp_path / "m", "--train",
                           "--iters", 1, "--pack", "--method", "mebp"))
    assert rc == 1 and "--pack needs --method mesp" in err


@pytest.mark.parametrize("damage", ["missing", "type"])
def test_a_broken_config_json_is_one_line(tiny_model_dir, text_data, tmp_path, damage):
    import shutil
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    if damage == "missing":
        del cfg["hidden_size"]
    else:
        cfg["num_hidden_layers"] = "two"
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out, err = cli(*base(d, text_data, tmp_path / "ad", "--train", "--iters", 1))
    assert rc == 1 and err.startswith("error: ") and "config.json" in err, err
    assert "Traceback" not in out + err and err.count("\n") == 1


def test_rank_above_the_smallest_adapted_dimension_is_refused(tiny_model_dir, text_data,
                                                              tmp_path):
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--iters", 1, "--rank", 4096))
    assert rc == 1 and "--rank 4096 is larger than the smallest adapted dimension" in err


def test_batch_larger_than_the_training_set_is_refused(tiny_model_dir, text_data, tmp_path):
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--iters", 1, "--batch-size", 100))
    assert rc == 1 and "--batch-size 100 is larger than the training set" in err



def test_the_default_plan_uses_this_device_and_says_so(tiny_model_dir, text_data, tmp_path):
    """No budget: the step plans against this machine's memory and the log states the
    plan in one line; --memory-budget caps it; --activation-plan minimal forces none."""
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "a", "--train",
                             "--iters", 1, "--method", "mesp"))
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("activation plan"))
    assert re.search(r"activation plan: (\d+) of \1 blocks", line), line
    assert ("physical memory" in line or "working set" in line) and "margin" in line
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "b", "--train",
                             "--iters", 1, "--method", "mesp", "--activation-plan",
                             "minimal"))
    assert rc == 0 and "activation plan: minimal" in out, err


def test_a_budget_below_the_runtime_blames_the_runtime_in_training(tiny_model_dir, text_data,
                                                                   tmp_path):
    rc, out, err = cli(*base(tiny_model_dir, text_data, tmp_path / "ad", "--train",
                             "--iters", 1, "--memory-budget", "2MB"))
    assert rc == 1 and "The runtime alone" in err and "weights alone" not in err, err
