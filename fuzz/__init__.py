"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that take bytes from anyone.

`python3 -m fuzz <target> [--runs N | --seconds S]`; see docs/fuzzing.md. Not part of the
default test run beyond the short smoke budget in tests/fuzz.
"""
