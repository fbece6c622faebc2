"""The fault and load suite: real processes killed, connections cut, sustained load.

See docs/reliability.md for what each test injects and what it measured.
"""
