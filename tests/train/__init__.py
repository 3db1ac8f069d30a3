"""Tests of lorank.train (a package: module names stay unique across test directories)."""
