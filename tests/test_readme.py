"""README.md cannot rot: its ```bash commands that run on the bundled demo
model (the main LoRA command with few iterations, the follow-up generation
with the adapters, the demo's accuracy check, `mesp_mlx.memory` estimates) are
executed in a temporary directory, and its ```python blocks run as written.
A line ending in `# not run in tests` is skipped. tests/test_docs.py applies
the same rules to docs/*.md."""

import re
import shlex
import sys

import pytest
from page_commands import (DEMO_MODEL, ITERS, MAX_TOKENS, README, ROOT, _flag, _shell,
                           bash_blocks, command_lines, parse, python_blocks,
                           readme_commands, run_command, run_python_block)


SAMPLE = """
Intro.

```bash
pip install -e ".[dev]"
python -m mesp_mlx.lora --model demo --train --data demo --iters 200
python -m mlx_lm generate --model "$(python -c 'import mesp_mlx.demo as d; print(d.model_path())')" \\
    --adapter-path adapters --prompt "Question: hi"
mlx_lm.generate --model demo-like --adapter-path /abs/adapters --prompt x  # not run in tests
mlx_lm.generate --model mesp_mlx/demo/model --adapter-path /abs/adapters --prompt x
python -m mesp_mlx.lora --model Qwen2.5-0.5B --train --data ./data
python -m mesp_mlx.memory --model Qwen2.5-3B --no-measure --device-profile iphone-8gb
python -m mesp_mlx.memory --model Qwen2.5-3B
python -m mesp_mlx.memory --model Qwen2.5-3B --find rank
python -m mesp_mlx.memory --model Qwen2.5-3B --find rank --measure
python -m mesp_mlx.demo.accuracy --adapter-path adapters
python -m bench.pareto --models 0.5B
```

```python
print("not bash")
```
"""


def test_parser_classifies_and_rewrites(tmp_path):
    cmds = [parse(line, tmp_path) for block in bash_blocks(SAMPLE)
            for line in command_lines(block)]
    assert [(c.kind, c.run) for c in cmds] == [
        ("other", False), ("lora", True), ("generate", True), ("other", False),
        ("generate", True), ("lora", False), ("memory", True), ("memory", False),
        ("memory", True), ("memory", False), ("demo", True), ("other", False)]
    lora, gen = cmds[1].argv, cmds[2].argv
    assert lora[:3] == [sys.executable, "-m", "mesp_mlx.lora"]
    assert _flag(lora, "--iters") == ITERS
    assert _flag(lora, "--adapter-path") == str(tmp_path / "adapters")
    assert gen[:4] == [sys.executable, "-m", "mlx_lm", "generate"]
    assert _flag(gen, "--adapter-path") == str(tmp_path / "adapters")
    assert _flag(gen, "--max-tokens") == MAX_TOKENS
    assert _shell(gen).count(shlex.quote(sys.executable)) == 2   # $(python ...) too
    assert _flag(cmds[4].argv, "--model") == str(ROOT / "mesp_mlx/demo/model")
    assert _flag(cmds[4].argv, "--adapter-path") == str(tmp_path / "adapters")
    assert "not the bundled demo model" in cmds[5].why
    assert cmds[10].argv[:3] == [sys.executable, "-m", "mesp_mlx.demo.accuracy"]
    assert _flag(cmds[10].argv, "--adapter-path") == str(tmp_path / "adapters")


# ---------------------------------------------------------------- README tests

def test_readme_has_main_and_generate_commands(tmp_path):
    assert README.is_file(), "README.md is missing"
    cmds = readme_commands(tmp_path)
    runnable = [c for c in cmds if c.run]
    assert any(c.kind == "lora" and "--train" in c.argv for c in runnable), \
        "README.md has no runnable main command (```bash block with " \
        "`python -m mesp_mlx.lora --model demo --train --data demo ...`)"
    assert any(c.kind == "generate" and "--adapter-path" in c.argv for c in runnable), \
        "README.md has no runnable generation command with --adapter-path on the demo model"


def test_readme_generate_prompts_are_not_templated_twice(tmp_path):
    """mlx_lm generate applies the model's chat template to --prompt (unless
    --ignore-chat-template): a prompt already in the demo's Question/Answer
    form would become 'Question: Question: ...\\nAnswer:\\nAnswer:'."""
    for c in readme_commands(tmp_path):
        if (c.kind == "generate" and c.run and c.argv[2] == "mlx_lm"
                and "--ignore-chat-template" not in c.argv):
            prompt = _flag(c.argv, "--prompt") or ""
            assert not re.search(r"^\s*Question:|Answer:\s*$", prompt), \
                f"{c.line}\n--prompt is templated again by mlx_lm generate: pass the " \
                "bare question (e.g. --prompt \"What is the opposite of thin?\") " \
                "or add --ignore-chat-template"


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                    reason=f"demo model not built ({DEMO_MODEL}/config.json missing)")
def test_readme_commands_run(tmp_path):
    """Runs in README order (generation uses the adapters trained before it);
    test_readme_has_main_and_generate_commands checks that there are some."""
    for c in readme_commands(tmp_path):
        if c.run:
            run_command(c, tmp_path)


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                    reason=f"demo model not built ({DEMO_MODEL}/config.json missing)")
def test_readme_python_snippets_run_as_written(tmp_path):
    """Every ```python block runs unchanged (its inputs defined)."""
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    for code in blocks:
        run_python_block(code, tmp_path)


def test_readme_mentions_the_plot_extra():
    assert 'pip install "mesp-mlx[plot]"' in README.read_text()
