"""The report comparison's numbers against hand-computed values (evomerge.report)."""

import math

import pytest

from evomerge.report import line, paired, summary

EXPORT = {"a": {"t": ([0, 1, 2, 3], [1.0, 0.0, 1.0, 1.0])}, "b": {"u": ([0, 1, 2, 3], [1.0, 1.0, 0.0, 0.0])}}
OTHER = {"a": {"t": ([0, 1, 2, 3], [0.0, 0.0, 1.0, 1.0])}, "b": {"u": ([0, 1, 2, 3], [1.0, 0.0, 0.0, 0.0])}}


def test_mean_and_standard_error_by_hand():
    # a: mean 3/4, sample variance 0.75 / 3 = 0.25, over 4 documents 0.0625; b: 1/2, 1/3, 1/12
    s = summary(EXPORT, ["a", "b"])
    assert s["mean"] == pytest.approx(0.625)
    assert s["se"] == pytest.approx(math.sqrt(0.0625 + 1 / 12) / 2)


def test_paired_difference_by_hand():
    # per-document differences: a [1, 0, 0, 0], b [0, 1, 0, 0]: each mean 1/4, variance 0.25 / 4
    d = paired(EXPORT, OTHER, ["a", "b"])
    assert d["difference"] == pytest.approx(0.25)
    assert d["difference_se"] == pytest.approx(math.sqrt(0.125) / 2)
    assert d["margin_se"] == pytest.approx(0.25 / (math.sqrt(0.125) / 2))
    assert d["difference"] == pytest.approx(summary(EXPORT, ["a", "b"])["mean"] - summary(OTHER, ["a", "b"])["mean"])
    assert paired(EXPORT, EXPORT, ["a", "b"]) == {"difference": 0.0, "difference_se": 0.0, "margin_se": None}
    with pytest.raises(ValueError, match="objective a: the two models were scored on no common document"):
        paired(EXPORT, {"a": {"t": ([9], [1.0])}, "b": OTHER["b"]}, ["a", "b"])


def test_the_printed_line():
    comparison = {
        "objectives": ["a", "b"],
        "export": {"trial": 7, **summary(EXPORT, ["a", "b"])},
        "best_baseline": {"trial": 0, "label": "ties density=0.5", **summary(OTHER, ["a", "b"])},
    }
    comparison["best_baseline"].update(paired(EXPORT, OTHER, ["a", "b"]))
    assert line(comparison) == (
        "report split, mean over 2 objectives ± standard error: export 0.6250 ± 0.1909; "
        "best hand baseline (ties density=0.5, trial 0) 0.3750 ± 0.1909, export +0.2500 = +1.4 SE"
    )


def test_a_comparison_that_failed_says_so_in_its_line():
    assert line({"error": "OutOfMemoryError: CUDA out of memory"}) == (
        "report comparison not made: OutOfMemoryError: CUDA out of memory (the export is complete; "
        "--no-compare skips it)"
    )
