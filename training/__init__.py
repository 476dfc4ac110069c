"""Corpus and training of the embedded model pgpt-code; lives in the repository, not in the installed package."""
