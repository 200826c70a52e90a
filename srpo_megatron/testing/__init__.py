"""Test infrastructure shipped with the package: stand-ins for external services on CPU."""
