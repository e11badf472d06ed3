"""benchmarks/common.py: BENCH line parsing, ratio orientation, table/doc rewriting, timing, RSS."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402


def _line(**kw) -> str:
    row = {"section": "prior_train", "case": "default", "impl": "dalle", "metric": "tokens/s", "value": 1.0}
    row.update(kw)
    return common.PREFIX + json.dumps(row)


def test_emit_roundtrips_through_parse(capsys):
    common.emit("sampling", "paper-shaped", "dalle", "s", 2.5, higher_is_better=False, peak_rss_mb=12.34, note="x")
    rows = common.parse_lines("noise before\n" + capsys.readouterr().out + "tqdm 50%|###\n")
    assert rows == [{"section": "sampling", "case": "paper-shaped", "impl": "dalle", "metric": "s", "value": 2.5,
                     "higher_is_better": False, "peak_rss_mb": 12.3, "note": "x"}]


def test_emit_turns_nan_into_null(capsys):
    common.emit("s", "c", "dalle", "m", float("nan"))
    assert common.parse_lines(capsys.readouterr().out)[0]["value"] is None


def test_malformed_bench_lines_name_the_line():
    with pytest.raises(ValueError, match="line 2: BENCH line is not JSON"):
        common.parse_lines("ok\nBENCH {not json\n")
    with pytest.raises(ValueError, match="line 1: BENCH line lacks impl, value"):
        common.parse_lines('BENCH {"section": "a", "case": "b", "metric": "m"}')


def test_advantage_is_oriented_so_bigger_means_dalle_better():
    fast = {"value": 4.0, "higher_is_better": False}   # seconds
    slow = {"value": 40.0, "higher_is_better": False}
    assert common.advantage(fast, slow) == pytest.approx(10.0)
    assert common.advantage({"value": 90.0}, {"value": 100.0}) == pytest.approx(0.9)
    assert common.advantage({"value": None}, {"value": 1.0}) is None


def test_is_ours_never_counts_the_peer_dalle_pytorch():
    assert common.is_ours("dalle") and common.is_ours("dalle+compile") and common.is_ours("dalle-bf16")
    assert not common.is_ours("dalle-pytorch") and not common.is_ours("gpt2-hf")


def test_table_marks_targets_met_and_missed():
    rows = common.parse_lines("\n".join([
        _line(value=130.0), _line(impl="dalle-pytorch", value=100.0), _line(impl="gpt2-hf", value=200.0),
        _line(metric="MFU", value=0.2)]))
    table = common.render_table(rows)
    assert "1.300× dalle-pytorch ✓" in table
    assert "0.650× gpt2-hf ✗ (target 0.9×)" in table
    assert "✗ (target 0.4)" in table  # MFU below 40%


def test_rewrite_doc_replaces_only_between_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\nintro\n{common.BEGIN}\nold table\n{common.END}\nclosing notes\n")
    common.rewrite_doc(doc, f"{common.BEGIN}\nnew\n{common.END}")
    assert doc.read_text() == f"# B\nintro\n{common.BEGIN}\nnew\n{common.END}\nclosing notes\n"
    common.rewrite_doc(doc, f"{common.BEGIN}\nnew\n{common.END}")  # idempotent
    assert doc.read_text().count(common.BEGIN) == 1


def test_time_interleaved_alternates_contenders():
    order: list[str] = []
    times = common.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                    repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_peak_rss_sees_a_block_allocation():
    with common.peak_rss() as rss:
        block = bytearray(64 * 2**20)  # 64 MiB, touched
        block[:: 4096] = b"x" * len(block[:: 4096])
    del block
    assert 48 < rss.delta_mb < 1024


def test_collect_and_fold_cli(tmp_path):
    log = tmp_path / "bench_x.log"
    log.write_text(_line(value=3.0) + "\n" + _line(impl="gpt2-hf", value=2.0) + "\n")
    out, doc = tmp_path / "res" / "bench_x.json", tmp_path / "doc.md"
    out.parent.mkdir()
    cli = [sys.executable, "-m", "benchmarks.common"]
    subprocess.run(cli + ["collect", "bench_x", "cmd", str(log), "0", "1.5", str(out)], cwd=ROOT, check=True)
    assert json.loads(out.read_text())["rows"][1]["impl"] == "gpt2-hf"
    subprocess.run(cli + ["fold", str(out.parent), str(doc)], cwd=ROOT, check=True)
    assert "1.500× gpt2-hf ✓" in doc.read_text()


def test_collect_cli_bad_line_is_one_clear_error(tmp_path):
    log = tmp_path / "bad.log"
    log.write_text("BENCH [1, 2]\n")
    r = subprocess.run([sys.executable, "-m", "benchmarks.common", "collect", "bad", "c", str(log), "0", "1",
                        str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: line 1: BENCH line lacks section, case, impl, metric, value: 'BENCH [1, 2]'"]


def test_run_sh_rejects_unknown_benchmark_names():
    r = subprocess.run(["bash", "benchmarks/run.sh", "--no-setup", "bench_does_not_exist"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: no benchmark named bench_does_not_exist (see benchmarks/bench_*.py)"


def test_load_results_skips_json_that_is_not_a_run_record(tmp_path):
    (tmp_path / "bench_a.json").write_text(json.dumps({"script": "bench_a", "rows": []}))
    (tmp_path / "profile_trace.json").write_text(json.dumps({"traceEvents": []}))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert [r["script"] for r in common.load_results(tmp_path)] == ["bench_a"]
