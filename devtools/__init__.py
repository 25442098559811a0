"""Development tools beside the daemon: generated scenes and scoring, the demo, benchmarks and
test fixtures. Not part of the wheel that a Pi installs."""
