"""The shared server kit: settings, auth, errors, logging, metrics, database and server helpers.

Every module has one job; see docs/kit.md for how the pieces fit together.
"""
