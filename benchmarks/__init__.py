"""The benchmarks behind `glr bench …`, outside the product package: each measures a stage
or a machine and writes its results to metrics/bench/ (docs/benchmarks.md). `glr bench`
imports a benchmark's module only when it runs (`benchmarks.cli` registers the parsers)."""
