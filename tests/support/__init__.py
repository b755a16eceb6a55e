"""Helpers for the test suites: frames, hostile clients, fault injection, figure recording.

Only tests import this package. The benchmarks never do: ``python -m bench reliability`` runs the
reliability suite in a subprocess and reads the figures it recorded (see ``figures``).
"""
