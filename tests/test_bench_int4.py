"""benchmarks/bench_int4.py --cpu-smoke: the harness runs end to end in the Triton interpreter (tiny shapes),
checks every int4 result against the exact reference, and writes rows with the project's result fields."""
import json

from benchmarks import common
from benchmarks.bench_int4 import main

FIELDS = {"bench", "case", "metric", "value", "unit", "baseline", "baseline_value", "floor", "device", "date",
          "commit", "command"}


def test_bench_int4_cpu_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIXTRAL_RT_COMMIT", "test-commit")
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)      # main() repoints it; undone after
    main(["--cpu-smoke", "--rows", "1,16,70", "--results-dir", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "int4_cpu_smoke.jsonl").read_text().splitlines()]
    cases = {r["case"] for r in rows}
    for shape in ("small (96x256)", "awkward (40x384)"):
        for impl in ("M=1 int4 gemv", "M=1 int4 gemm", "M=16 int4 gemm", "M=70 int4 gemm", "M=70 int4 dequant",
                     "M=1 fp8", "M=70 fp8"):
            assert f"tiny {shape} {impl}" in cases, (shape, impl)
    for r in rows:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["commit"] == "test-commit" and r["device"] == "cpu" and r["unit"] == "us" and r["value"] > 0
        assert r["baseline_value"] > 0 and r["baseline"].startswith("torch fp32")
        if "int4" in r["case"]:
            assert r["rel_err"] < 1e-5 and r["fp8_us"] > 0 and r["int4_bytes"] > 0
    assert "fastest int4 path at M = 1" in capsys.readouterr().out
