"""Example systems that flowcheck's tests, demo and benchmarks drive.

They stand for a user's own code: nothing here imports flowcheck.
"""
