"""Bad-input corpus (issue 9): every case asserts a clear error (or a counted skip) in bounded time and that
nothing was half-written. Fixtures are written by the tests into tmp_path."""
