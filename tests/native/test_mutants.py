"""tests/native/mutants.py's planted bugs still apply to today's C source (the script itself is slow)."""

import mutants  # tests/native/mutants.py
import pytest


@pytest.mark.parametrize("name", sorted(mutants.MUTANTS))
def test_each_mutant_text_occurs_once(name):
    file, old, new, _ = mutants.MUTANTS[name]
    source = (mutants.FOLDER / file).read_text()
    assert source.count(old) == 1, f"{name}: update MUTANTS, its text occurs {source.count(old)} times"
    assert mutants.mutant_source(name) == source.replace(old, new) != source
