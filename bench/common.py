"""What every benchmark shares: where rows live, the environment each row is stamped
with, row files, markdown tables and the environment footer built from the rows.

A row is one JSON object per line in bench/results/<benchmark>.jsonl; it carries the
STAMP fields, so a table can be re-rendered anywhere from its rows alone. MB = 10⁶ bytes.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
MB = 10**6
STAMP = ("commit", "dirty", "date", "host", "device", "mlx", "mlx_lm", "command")


def git_commit():
    """(12-digit HEAD, dirty): dirty = tracked changes outside the benchmarks' outputs."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=ROOT).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short=12", "HEAD") or None
    dirty = bool(commit and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)bench/RESULTS.md"))
    return commit, dirty


def host() -> str:
    """The CPU and its logical CPU count, e.g. 'AMD EPYC (2 logical CPUs)'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        if sys.platform == "darwin":
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True).stdout.strip() or cpu
    return f"{cpu} ({os.cpu_count()} logical CPUs)"


def device() -> str:
    """MLX's device as mx.device_info() names it (architecture, name, memory)."""
    import mlx.core as mx
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        return str(mx.default_device())
    keys = ("architecture", "device_name", "memory_size")
    return ", ".join(f"{k} {info[k]}" for k in keys if k in info)


def command(module: str, argv) -> str:
    """The command line that reruns `module` with `argv` (LD_PRELOAD included)."""
    pre = os.environ.get("LD_PRELOAD", "")
    return (f"LD_PRELOAD={pre} " if pre else "") + shlex.join(
        ["python", "-m", module, *map(str, argv)])


def environment(cmd: str) -> dict:
    """The STAMP fields of this process, read once per run."""
    from importlib.metadata import version

    commit, dirty = git_commit()
    return {"commit": commit, "dirty": dirty, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "host": host(), "device": device(), "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"), "command": cmd}


def now() -> str:
    """UTC time of a row, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def subprocess_env() -> dict:
    """os.environ with the repository root on PYTHONPATH, so that a child process can
    run `python -m bench.<name>` whatever its working directory."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def append_row(path: Path, row: dict, env: dict) -> dict:
    """Stamp `row` with `env` (a STAMP field the row already has wins) and append it to
    the JSONL file `path`; returns the stamped row."""
    row = {**{k: env.get(k) for k in STAMP}, **row}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def load_rows(path: Path) -> list:
    """The rows of a JSONL file, oldest first ([] if absent; a torn line is skipped)."""
    rows = []
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: {path}:{i} is not JSON; ignored", file=sys.stderr)
    return rows


def newest(rows, key) -> list:
    """The last row per key(row), in the order the keys first appear."""
    out = {}
    for r in rows:
        out[key(r)] = r
    return list(out.values())


def wrote(path: Path):
    """The last line of a benchmark run: where its rows went, what renders them."""
    print(f"rows in {path}; `python -m bench.report` rebuilds {RESULTS_MD.relative_to(ROOT)}")


def mb(x) -> str:
    return "" if x is None else f"{x / MB:.1f}"


def status(row) -> str:
    """'ok', or the status and the first 70 characters of the error."""
    s = row.get("status", "missing")
    if s == "ok":
        return "ok"
    err = (row.get("error") or "").replace("|", "/").replace("\n", " ")
    return f"{s}: {err[:70]}" if err else s


def table(head, body, align="") -> list:
    """Markdown table lines; align holds one 'l' or 'r' per column (default 'l')."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(head), "l"))
    return (["| " + " | ".join(head) + " |", rule]
            + ["| " + " | ".join(str(c) for c in line) + " |" for line in body])


def _rows(n: int) -> str:
    return f"{n} row" + "s" * (n != 1)


def _distinct(rows, get, show=str) -> str:
    """One value, or each value with its row count; None reads 'not recorded'."""
    seen = {}
    for r in rows:
        v = get(r)
        seen[v] = seen.get(v, 0) + 1
    name = {v: "not recorded" if v is None else show(v) for v in seen}
    if len(seen) <= 1:
        return next(iter(name.values()), "not recorded")
    return ", ".join(f"{name[v]} ({_rows(n)})" for v, n in seen.items())


def _commit(r):
    c = r.get("commit")
    return None if c is None else c + (" with uncommitted changes" if r.get("dirty") else "")


def footer(rows, dtype=None, reproduce=None) -> str:
    """The environment footer of a table, from its rows' STAMP fields (and `blas`, the
    BLAS mapped in a worker). `reproduce`: the command stated where rows have none."""
    dates = sorted({r["date"] for r in rows if r.get("date")})
    undated = sum(1 for r in rows if not r.get("date"))
    when = ("on a date not recorded" if not dates else dates[0] if len(dates) == 1
            else f"{dates[0]} to {dates[-1]}")
    if dates and undated:
        when += f" ({_rows(undated)} not dated)"
    parts = [f"Device: {_distinct(rows, lambda r: r.get('device'), lambda v: f'`{v}`')}",
             f"host: {_distinct(rows, lambda r: r.get('host'))}",
             f"MLX {_distinct(rows, lambda r: r.get('mlx'))}",
             f"mlx-lm {_distinct(rows, lambda r: r.get('mlx_lm'))}",
             f"dtype {dtype or _distinct(rows, lambda r: r.get('dtype'))}"]
    if any(r.get("blas") for r in rows):
        parts.append(f"BLAS mapped in the workers: {_distinct(rows, lambda r: r.get('blas'))}")
    parts += [f"commit {_distinct(rows, _commit)}", f"measured {when}"]
    cmd = _distinct(rows, lambda r: r.get("command"), lambda v: f"`{v}`")
    if reproduce and all(r.get("command") is None for r in rows):
        cmd = f"not recorded in the rows; to reproduce: `{reproduce}`"
    return "**Environment.** " + "; ".join(parts) + f". Command: {cmd}."
