"""batchflux benchmarks (not tests): ``python -m bench all`` or ``python -m bench NAME``.

Each scenario starts the simulator with uvicorn in its own process on loopback, runs
``batchflux run`` (and, where the scenario says so, the plain asyncio script
``bench/peer_plain.py``) in their own processes against the same simulator settings, and
reports ratios computed from what that run measured. See docs/benchmarks.md.
"""
