"""Bad-input corpus (table of cases in docs/reliability.md): every case asserts a clear error (or a counted
skip) in bounded time and that nothing was half-written. Fixtures are written by the tests into tmp_path."""
