"""Tasks for the bad-input tests (tests/integration/test_bad_inputs.py)."""
