"""How the README's and the docs' commands are read and run by the tests: the
```bash blocks on the demo model (with few iterations, in a temporary directory) and
the ```python blocks as written. A line ending in `# not run in tests` is skipped."""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_MODEL = ROOT / "mesp_mlx" / "demo" / "model"
SKIP_MARK = "# not run in tests"
ITERS = "5"              # the main command's --iters, overridden
MAX_TOKENS = "10"        # generation length, overridden


@dataclass
class Command:
    line: str            # as written in the README
    kind: str            # "lora", "generate", "memory", "demo", "mesp" or "other"
    argv: list           # shell words after rewriting (program mapped to this Python)
    run: bool            # runnable here (demo model or estimate only)
    why: str = ""        # why not, if not


def bash_blocks(text: str) -> list:
    """Contents of the ```bash / ```sh fenced blocks, in order."""
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, re.M | re.S)


def _open_quote(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
        return False
    except ValueError:
        return True


def command_lines(block: str) -> list:
    """Logical command lines: `\\` continuations and quoted newlines joined,
    comments and blanks dropped."""
    out, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if _open_quote(cur):
            cur += "\n"
            continue
        line, cur = cur.strip(), ""
        line = line[2:] if line.startswith("$ ") else line
        if line and not line.startswith("#"):
            out.append(line)
    if cur.strip():
        out.append(cur.strip())          # unbalanced quotes: parse() reports it
    return out


def _flag(words, name):
    return words[words.index(name) + 1] if name in words[:-1] else None


def _set_flag(words, name, value):
    if name in words[:-1]:
        words[words.index(name) + 1] = value
    else:
        words += [name, value]


def parse(line: str, adapter_dir: Path) -> Command:
    """Classify a README command and rewrite it to run here: `python` and
    `mlx_lm.X` map to this interpreter, --iters and --max-tokens shrink,
    --adapter-path moves into `adapter_dir`."""
    if line.endswith(SKIP_MARK):
        return Command(line, "other", [], False, "marked " + SKIP_MARK)
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        return Command(line, "other", [], False, f"not a simple command ({e})")
    if not words:
        return Command(line, "other", [], False, "empty")
    head = words[0]
    if head in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        module, rest = words[2], words[3:]
        if module == "mlx_lm" and rest:
            module, rest = f"mlx_lm.{rest[0]}", rest[1:]
    elif head.startswith("mlx_lm."):
        module, rest = head, words[1:]
    else:
        return Command(line, "other", words, False, "not a python -m / mlx_lm command")
    if module in ("mlx_lm.generate", "mesp_mlx.generate"):
        kind = "generate"
    elif module == "mesp_mlx.lora":
        kind = "lora"
    elif module == "mesp_mlx.memory":
        kind = "memory"
    elif module.startswith("mesp_mlx.demo"):
        kind = "demo"                    # the demo's own scripts (accuracy, ...)
    else:
        kind = "mesp" if module.startswith("mesp_mlx") else "other"
    model = _flag(rest, "--model") or ""
    on_demo = (model == "demo" or "mesp_mlx.demo" in model or "mesp_mlx/demo" in model
               or kind == "demo")
    if "mesp_mlx/demo" in model and not Path(model).is_absolute() and "$" not in model:
        _set_flag(rest, "--model", str(ROOT / model))     # commands run elsewhere
    if kind == "lora":
        if "--iters" in rest or "--train" in rest:
            _set_flag(rest, "--iters", ITERS)
    given = _flag(rest, "--adapter-path")
    if kind in ("lora", "generate", "demo") and given:
        _set_flag(rest, "--adapter-path", str(adapter_dir / Path(given).name))
    elif kind == "lora":
        _set_flag(rest, "--adapter-path", str(adapter_dir / "adapters"))
    if kind == "generate":
        _set_flag(rest, "--max-tokens", MAX_TOKENS)
    argv = ([sys.executable, "-m", "mlx_lm", module.split(".", 1)[1]]
            if module.startswith("mlx_lm.") else [sys.executable, "-m", module]) + rest
    if kind == "memory":          # estimates only (--no-measure, or --find without --measure)
        estimate = "--no-measure" in rest or ("--find" in rest and "--measure" not in rest)
        ok = on_demo or estimate
        return Command(line, kind, argv, ok, "" if ok else "measures a real-size model")
    if kind == "other":
        return Command(line, kind, argv, False, f"{module} is not a mesp_mlx command")
    return Command(line, kind, argv, on_demo, "" if on_demo else
                   f"--model {model or '(none)'} is not the bundled demo model")


def _shell(argv: list) -> str:
    """argv as a bash line; "$(python ...)" words stay command substitutions."""
    def word(w):
        if w.startswith("$(") and w.endswith(")"):
            inner = re.sub(r"^\$\(\s*python3?\b", "$(" + shlex.quote(sys.executable), w)
            return '"' + inner + '"'
        return shlex.quote(w)
    return " ".join(word(w) for w in argv)


def page_commands(page: Path, adapter_dir: Path) -> list:
    text = page.read_text()
    return [parse(line, adapter_dir) for block in bash_blocks(text)
            for line in command_lines(block)]


def readme_commands(adapter_dir: Path) -> list:
    return page_commands(README, adapter_dir)


def command_env() -> dict:
    """Offline, and this checkout first on the path (commands run elsewhere)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))


def run_command(c: Command, cwd: Path) -> str:
    """Run one runnable command in `cwd`; assert it worked; return its output."""
    proc = subprocess.run(["bash", "-c", _shell(c.argv)], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    ok = proc.returncode in ((0, 2) if c.kind == "memory" else (0,))   # 2: does not fit
    assert ok and "Traceback" not in out, \
        f"command failed (exit {proc.returncode}):\n  {c.line}\nran as:\n  " \
        f"{_shell(c.argv)}\n--- output ---\n{out[-3000:]}"
    if c.kind == "lora" and "--train" in c.argv:
        adapters = Path(_flag(c.argv, "--adapter-path"))
        assert (adapters / "adapters.safetensors").is_file(), out[-2000:]
        assert (adapters / "adapter_config.json").is_file()
        assert re.search(r"Iter \d+: train loss", out), out[-2000:]
        assert "Saved adapters to" in out and "peak" in out, out[-2000:]
    if c.kind == "generate":
        assert proc.stdout.strip(), f"{c.line}: no generated text\n{out}"
    return out


def run_python_block(code: str, cwd: Path) -> str:
    """Run one ```python block unchanged; the `# loss X.XXX` values it shows must print."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"python block failed:\n{code}\n{proc.stderr[-3000:]}"
    for want in re.findall(r"#\s*(loss \d+\.\d+)", code):     # printed values it shows
        assert want in proc.stdout, (want, proc.stdout)
    return proc.stdout


# ---------------------------------------------------------------- parser tests


def python_blocks(text: str) -> list:
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, re.M | re.S)
