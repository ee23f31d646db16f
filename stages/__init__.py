"""Pipeline stages: one module per stage, each with a typed params object, `run()` and `main()`."""
