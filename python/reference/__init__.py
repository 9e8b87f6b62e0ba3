"""Pure-PyTorch oracles: the single truth that tests and benchmarks import (not installed)."""
