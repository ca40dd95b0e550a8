"""The similarity benchmark suite's own pieces: torch's CLIP contender is the InfoNCE loss, the README's similarity
table is generated from a run's rows (and absent for runs without them)."""

import pytest
import torch

from benchmarks import readme_tables as rt
from benchmarks.suites.similarity import _sizes, clip_loss
from metricops import reference


def test_clip_contender_is_symmetric_info_nce():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    qs = [q.clone().requires_grad_() for _ in range(2)]
    a = clip_loss(qs[0], k, 0.05)
    b = reference.info_nce_loss(qs[1], k, temperature=0.05, symmetric=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, qs[0])[0], torch.autograd.grad(b, qs[1])[0])


def test_full_sizes_are_the_issues():
    sizes = _sizes(False)
    assert sizes["default"] == (2048, 128) and (512, 128) in sizes["ntxent_loss"] and sizes["info_nce"] == (16384, 256)
    table_sizes = {(r.op, tuple(sorted(r.params.items()))) for r in rt.SIMILARITY.rows}
    assert ("supcon_loss", (("B", 2048), ("D", 128))) in table_sizes


def _report(with_similarity: bool) -> dict:
    rows = []
    if with_similarity:
        for spec in rt.SIMILARITY.rows:
            names = [e.contender for e in spec.entries if isinstance(e, rt.Cell)]
            yard = [n for n in names if "GEMM" in n]
            seconds = {n: 0.01 * (1 + 2 * i) for i, n in enumerate(names)}
            rows.append(
                {
                    "op": spec.op,
                    "mode": spec.mode,
                    "params": dict(spec.params, dtype="float32"),
                    "seconds": seconds,
                    "errors": {},
                    "peak_bytes": {n: 2**20 for n in names},
                    "agreement": {
                        n: {"agrees": True, "value_rel_err": 0.0, "grad_rel_err": 0.0}
                        for n in names[1:]
                        if n not in yard
                    },
                    "yardsticks": yard,
                }
            )
    return {"results": rows}


def test_similarity_table_renders_from_the_rows():
    report = _report(True)
    report["environment"] = {"libraries": {"pytorch-metric-learning": "2.9.0"}}
    table = rt.render_table(report, rt.SIMILARITY)
    assert "| SupCon | B=2048, D=128 | 10.0 ms, 1 MiB | 30.0 ms (3.0×), 1 MiB | 50.0 ms (5.0×), 1 MiB |" in table
    assert "torch CLIP loss" in table and "| pytorch-metric-learning 2.9.0 / torch |" in table
    assert rt._has_similarity_rows(report) and not rt._has_similarity_rows(_report(False))
    report["results"][0]["agreement"]["reference"]["agrees"] = False
    with pytest.raises(rt.SpecError, match="computed something else"):
        rt.render_table(report, rt.SIMILARITY)
