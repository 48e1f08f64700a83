"""Federated training: a gRPC server and clients over mutual TLS, strategies, secure aggregation,
differential privacy and a many-client simulator. See docs/federated.md.

Nothing is imported here, so `shoal.federated.cli` stays cheap to import.
"""
