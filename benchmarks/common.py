"""Shared helpers for benchmarks/bench_*.py (stdlib only: runs in the project venv and the peers venv).

Convention (benchmarks/README.md): each result is one stdout line ``BENCH {json}``; ``run.sh`` collects
them into ``benchmarks/results/<script>.json`` and ``python -m benchmarks.common fold`` rewrites the
table in ``docs/benchmarks.md`` between the markers below.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

PREFIX = "BENCH "
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"
REQUIRED = ("section", "case", "impl", "metric", "value")
PEERS = ("dalle-pytorch", "gpt2-hf", "torch-matmul")
# The benchmark targets (docs/benchmarks.md): (section, peer) -> minimal advantage of this project over that peer.
TARGETS: dict[tuple[str, str], float] = {
    ("prior_train", "dalle-pytorch"): 1.3,
    ("prior_train", "gpt2-hf"): 0.9,
    ("sampling", "dalle-pytorch"): 10.0,
    ("sampling", "gpt2-hf"): 0.9,
}
ABS_TARGETS: dict[tuple[str, str], float] = {("prior_train", "MFU"): 0.40}


def quick() -> bool:
    """True when BENCH_QUICK=1: shrink every size so a script finishes in seconds (tests, smoke)."""
    return os.environ.get("BENCH_QUICK", "0") not in ("", "0")


def threads() -> int:
    """Threads to give torch: env BENCH_THREADS, default all visible cores."""
    return int(os.environ.get("BENCH_THREADS", str(len(os.sched_getaffinity(0)))))


def is_ours(impl: str) -> bool:
    """`dalle` and its variants (`dalle+compile`, `dalle-fp32`); never the peer `dalle-pytorch`."""
    return impl not in PEERS and (impl == "dalle" or impl.startswith(("dalle+", "dalle-")))


def emit(section: str, case: str, impl: str, metric: str, value: float | None,
         higher_is_better: bool = True, peak_rss_mb: float | None = None, note: str = "") -> dict:
    """Print one ``BENCH {json}`` line (flushed) and return the row."""
    row: dict[str, Any] = {"section": section, "case": case, "impl": impl, "metric": metric,
                           "value": None if value is None or not math.isfinite(value) else float(value),
                           "higher_is_better": bool(higher_is_better)}
    if peak_rss_mb is not None:
        row["peak_rss_mb"] = round(float(peak_rss_mb), 1)
    if note:
        row["note"] = note
    print(PREFIX + json.dumps(row), flush=True)
    return row


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5,
                     warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, calls alternated A B A B ... so that noise from
    other processes on the machine hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


@dataclass
class RSS:
    """Peak resident memory of a block (MiB): `peak_mb` absolute, `delta_mb` above the start."""
    start_mb: float = float("nan")
    peak_mb: float = float("nan")

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


@contextlib.contextmanager
def peak_rss() -> Iterator[RSS]:
    """Measure the peak RSS of the enclosed block: the kernel's high-water mark (VmHWM) is reset
    by writing 5 to /proc/self/clear_refs, so several contenders can be measured in one process."""
    gc.collect()
    try:  # hand freed heap back to the OS, so a contender cannot hide in a predecessor's pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss = RSS(start_mb=_status_kb("VmRSS") / 1024)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # no reset possible: VmHWM is then the process peak so far (an upper bound)
    try:
        yield rss
    finally:
        rss.peak_mb = _status_kb("VmHWM") / 1024


def parse_lines(text: str) -> list[dict]:
    """The valid BENCH rows of a script's output; malformed ones raise ValueError naming the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith(PREFIX):
            continue
        try:
            row = json.loads(line[len(PREFIX):])
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {n}: BENCH line is not JSON ({exc.msg}): {line[:80]!r}") from None
        missing = [k for k in REQUIRED if k not in row] if isinstance(row, dict) else list(REQUIRED)
        if missing:
            raise ValueError(f"line {n}: BENCH line lacks {', '.join(missing)}: {line[:80]!r}")
        row.setdefault("higher_is_better", True)
        rows.append(row)
    return rows


def advantage(ours: dict, peer: dict) -> float | None:
    """How many times better `ours` is than `peer` (> 1: ours better), or None if not comparable."""
    a, b = ours.get("value"), peer.get("value")
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b if ours.get("higher_is_better", True) else b / a


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1e5 or (0 < abs(v) < 1e-2):
        return f"{v:.3g}"
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"


def _versus(row: dict, group: list[dict]) -> str:
    """Text of the 'vs peers' cell for one of our rows: ratio per peer, with the target."""
    parts = []
    for peer in group:
        if is_ours(peer["impl"]):
            continue
        adv = advantage(row, peer)
        target = TARGETS.get((row["section"], peer["impl"]))
        mark = "" if target is None or adv is None else (" ✓" if adv >= target else f" ✗ (target {target:g}×)")
        parts.append(f"{_fmt(adv)}× {peer['impl']}{mark}")
    target = ABS_TARGETS.get((row["section"], row["metric"]))
    if target is not None and row.get("value") is not None:
        parts.append("✓ target" if row["value"] >= target else f"✗ (target {target:g})")
    return "; ".join(parts)


def render_table(rows: list[dict]) -> str:
    """Markdown table: one line per row, grouped by (section, case, metric); our rows carry ratios."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["section"], r["case"], r["metric"]), []).append(r)
    out = ["| section | case | metric | impl | value | vs peers (> 1: dalle better) | peak RSS MiB | note |",
           "|---|---|---|---|---|---|---|---|"]
    for (section, case, metric), group in groups.items():
        for r in group:
            vs = _versus(r, group) if is_ours(r["impl"]) else ""
            rss = r.get("peak_rss_mb")
            out.append(f"| {section} | {case} | {metric} | {r['impl']} | {_fmt(r.get('value'))} | {vs} | "
                       f"{'' if rss is None else f'{rss:,.0f}'} | {r.get('note', '')} |")
    return "\n".join(out)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and Python of this machine (for the record in the doc)."""
    model = next((ln.split(":", 1)[1].strip() for ln in _run(["lscpu"]).splitlines()
                  if ln.startswith("Model name")), platform.processor())
    mem_kb = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def load_results(results_dir: Path) -> list[dict]:
    """Every results/<script>.json written by run.sh (other JSON files are skipped), by script name."""
    records = (json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")))
    return [r for r in records if isinstance(r, dict) and {"script", "rows"} <= r.keys()]


def render_block(results: list[dict]) -> str:
    """The text placed between the markers: run record (machine, versions, commands) + table."""
    lines = [BEGIN, "", "_Rewritten by `make bench`; do not edit by hand._", ""]
    if results:
        m = results[0].get("machine", {})
        lines += [f"Measured {m.get('date_utc', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
                  f"{m.get('mem_gib', '?')} GiB, {m.get('os', '?')}, Python {m.get('python', '?')}; "
                  f"load average at start {m.get('load_avg_1m', '?')} (other jobs share this machine). No GPU.", ""]
        versions = {k: v for r in results for k, v in r.get("versions", {}).items()}
        if versions:
            lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".", ""]
        lines += ["| script | command | exit | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['script']} | `{r['command']}` | {r['rc']} | {r['seconds']:.0f} |" for r in results]
        lines += ["", render_table([row for r in results for row in r.get("rows", [])])]
    else:
        lines.append("No results yet: run `make bench`.")
    return "\n".join(lines + ["", END])


def rewrite_doc(doc: Path, block: str) -> None:
    """Replace the text between the markers of `doc` (appended at the end when absent), atomically."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


def collect(script: str, command: str, log: Path, rc: int, seconds: float, out: Path,
            versions_python: str | None = None) -> int:
    """Turn one script's log into results/<script>.json; returns the number of BENCH rows."""
    rows = parse_lines(log.read_text(errors="replace"))
    versions = {}
    if versions_python:
        code = ("import json, importlib.metadata as m\nd={}\nfor p in ('torch','transformers','dalle-pytorch',"
                "'horovod','mlflow','dvc','prefect'):\n try: d[p]=m.version(p)\n except Exception: pass\nprint(json.dumps(d))")
        versions = json.loads(_run([versions_python, "-c", code]) or "{}")
    record = {"script": script, "command": command, "rc": rc, "seconds": seconds, "rows": rows,
              "machine": machine_info(), "versions": versions}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.common")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="one script's log -> results/<script>.json")
    for a in ("script", "command", "log", "rc", "seconds", "out"):
        c.add_argument(a)
    c.add_argument("--versions-python")
    f = sub.add_parser("fold", help="results/*.json -> table between the markers of the doc")
    f.add_argument("results_dir")
    f.add_argument("doc")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "collect":
            n = collect(args.script, args.command, Path(args.log), int(args.rc), float(args.seconds),
                        Path(args.out), args.versions_python)
            print(f"{args.script}: {n} BENCH rows")
        else:
            rewrite_doc(Path(args.doc), render_block(load_results(Path(args.results_dir))))
            print(f"rewrote the table in {args.doc}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_quick(script: str) -> list[dict]:
    """Run `python -m benchmarks.<script>` at BENCH_QUICK sizes, 1 thread; its BENCH rows (tests)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{script}"], cwd=Path(__file__).parents[1],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return parse_lines(r.stdout)


def section(name: str, **values: Any) -> Any:
    """One section of params.yaml (where every default lives) with some values replaced."""
    from dalle.config import REPO_ROOT, load_params

    current = getattr(load_params(REPO_ROOT / "params.yaml"), name)
    return type(current).model_validate({**current.model_dump(), **values})
