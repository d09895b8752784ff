"""Data manifests: which images a release may draw from (paths, sha256, splits, labels), and the
readers of image folders and label CSVs. The lowest room: imports only shared infrastructure.
"""
