"""
Coverage-guided fuzzing of the sans-IO core (atheris), and the invariants it checks.

``fuzz.harness`` holds the checks, in plain Python, so ``tests.test_fuzz_smoke``
replays the corpus and every crasher through exactly what the fuzzers assert.
``fuzz_decode.py`` and ``fuzz_frames.py`` are the atheris entry points;
``run.py`` is what ``make fuzz`` runs.
"""
