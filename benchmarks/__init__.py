"""deelm's benchmark scripts. Run each from the repository root as a module,
`python -m benchmarks.<script>`; shared helpers are in benchmarks.common."""
