"""Corpus and training of the embedded model pgpt-tiny; lives in the repository, not in the installed package."""
