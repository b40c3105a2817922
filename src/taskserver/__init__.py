"""taskserver: a priority task server for ML and data work, on Prefect 3 and Kubernetes."""

__version__ = "0.1.0"
