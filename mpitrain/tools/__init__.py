"""The tools beside the harness: bench, simulate, explain, diagnose (one module each,
split where a tool has several parts).  Each is a command of ``mpitrain`` (cli.py)."""
