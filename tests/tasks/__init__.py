"""Tests of lorank.tasks (a package: module names stay unique across test directories)."""
