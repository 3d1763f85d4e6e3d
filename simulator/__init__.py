"""An in-memory DashScope async video API simulator for tests, demos and benchmarks."""

from simulator.app import create_simulator

__all__ = ["create_simulator"]
