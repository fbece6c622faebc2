"""ecu-sidecar: the quota enforcer that meters ECU (Evaluation Compute Units)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
