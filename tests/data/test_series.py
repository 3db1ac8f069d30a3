"""lorank.data.series: the CO2 series (from a CSV; statsmodels' copy when installed),
windows, splits and the missing-statsmodels error."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lorank.data import series
from lorank.data.series import co2_csv, co2_splits, load_co2, series_windows


def write_co2_csv(path, weeks: int = 400, missing=(3, 4, 50)) -> torch.Tensor:
    """A synthetic weekly series (trend + yearly cycle) as statsmodels' layout
    (``date,co2``, empty cells for missing weeks); returns the full series (no gaps)."""
    t = torch.arange(weeks, dtype=torch.float64)
    x = 315 + 0.02 * t + 3 * torch.sin(2 * math.pi * t / 52)
    rows = ["date,co2"] + [f"{19580101 + i},{'' if i in missing else f'{float(v):.6f}'}"
                           for i, v in enumerate(x)]
    path.write_text("\n".join(rows) + "\n")
    return x


def test_windows_cover_the_series():
    x = torch.arange(10.0)
    w, ln = series_windows(x, 4, 2)
    assert w.shape == (4, 4, 1) and ln.tolist() == [4, 4, 4, 4]
    assert w[:, 0, 0].tolist() == [0, 2, 4, 6]
    w, ln = series_windows(x, 4, 4, keep_remainder=True)  # non-overlapping, full cover
    assert ln.tolist() == [4, 4, 2]
    mask = torch.arange(4).unsqueeze(0) < ln.unsqueeze(1)
    assert w[mask, 0].tolist() == x.tolist()
    assert w[2, 2:].abs().sum() == 0  # padding is zero
    w, ln = series_windows(x[:3], 4, 4, keep_remainder=True)
    assert ln.tolist() == [3]
    with pytest.raises(ValueError, match="no window of 4"):
        series_windows(x[:3], 4, 4)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        series_windows(x, 4, 0)
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, D\), got \(2, 2, 2\)"):
        series_windows(torch.zeros(2, 2, 2), 1, 1)


def test_load_csv_interpolates_missing_weeks(tmp_path):
    path = tmp_path / "co2.csv"
    x = write_co2_csv(path, missing=(3, 4, 50))
    got = load_co2(path)
    assert got.dtype == torch.float64 and got.shape == (400,)
    ok = [i for i in range(400) if i not in (3, 4, 50)]
    torch.testing.assert_close(got[ok], x[ok], atol=1e-6, rtol=0)
    # weeks 3 and 4 lie on the line between weeks 2 and 5
    torch.testing.assert_close(got[3], x[2] + (x[5] - x[2]) / 3, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[4], x[2] + 2 * (x[5] - x[2]) / 3, atol=1e-6, rtol=0)
    bad = tmp_path / "bad.csv"
    bad.write_text("date,ppm\n1,2\n")
    with pytest.raises(ValueError, match="no 'co2' column"):
        load_co2(bad)


def test_splits_standardize_with_training_statistics(tmp_path):
    path = tmp_path / "co2.csv"
    write_co2_csv(path, weeks=401, missing=())
    d = co2_splits(52, 13, valid_fraction=0.1, test_fraction=0.2, path=path)
    diff = load_co2(path).diff()
    assert d.weeks == {"train": 280, "valid": 40, "test": 80}  # 400 differences
    train = diff[:280]
    assert d.mean == pytest.approx(float(train.mean())) and d.std == pytest.approx(
        float(train.std()))
    z = (diff - d.mean) / d.std
    assert d.windows["train"].shape == (18, 52, 1)  # starts 0, 13, ..., 221
    torch.testing.assert_close(d.windows["train"][1, :, 0], z[13:65].float())
    for split, lo, hi in (("valid", 280, 320), ("test", 320, 400)):
        w, ln = d.windows[split], d.lengths[split]
        mask = torch.arange(52).unsqueeze(0) < ln.unsqueeze(1)
        torch.testing.assert_close(w[mask, 0], z[lo:hi].float())  # every week once, in order
        assert d.steps(split) == hi - lo
    no_valid = co2_splits(52, 13, valid_fraction=0.0, path=path, eval_remainder=False)
    assert no_valid.windows["valid"].shape[0] == 0 and no_valid.lengths["test"].tolist() == [52]
    with pytest.raises(ValueError, match="valid_fraction must be a probability in"):
        co2_splits(valid_fraction=1.5, path=path)
    with pytest.raises(ValueError, match="must be < 1"):
        co2_splits(valid_fraction=0.5, test_fraction=0.5, path=path)
    with pytest.raises(ValueError, match="fewer than window=400"):
        co2_splits(400, path=path)


def test_missing_statsmodels_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(series.importlib.util, "find_spec",
                        lambda name, *a: None if name == "statsmodels" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install statsmodels"):
        co2_csv()
    with pytest.raises(ModuleNotFoundError, match="pip install statsmodels"):
        load_co2()


def test_statsmodels_co2_series():
    pytest.importorskip("statsmodels")
    path = co2_csv()
    assert path.name == "co2.csv"
    x = load_co2()
    assert x.shape == (2284,) and torch.isfinite(x).all()
    assert float(x[0]) == pytest.approx(316.1)
    # 1958-05-10 is missing: halfway between 1958-05-03 (316.9) and 1958-05-17 (317.5)
    assert float(x[6]) == pytest.approx(317.2)
    d = co2_splits()
    assert sum(d.weeks.values()) == 2283 and d.weeks["test"] == 457
