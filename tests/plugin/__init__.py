"""Tests of the pytest plugin: small test projects run with pytester against the real brokers."""
