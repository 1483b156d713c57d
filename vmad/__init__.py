"""vmad: adaptive anomaly detection and capacity planning for IaaS virtual machines."""

__version__ = "0.1.0"
