"""Tests of lorank.nn structured models (a package so that its test modules do not clash with
tests/distributions/test_pcfg.py and test_hsmm.py)."""
