"""The load benchmark (not part of the test suite): `python -m bench.run`, see README.md."""
