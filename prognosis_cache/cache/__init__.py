"""The feature cache: contract 1 of docs/DESIGN.md (HDF5 schema v1), its fingerprint and its crash-safe writer."""
