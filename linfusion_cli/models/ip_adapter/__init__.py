"""IP-Adapters: the kind (kind.py, no torch), the installed adapter and its weights (adapter.py), and the chunked
cross-attention processor (attention.py)."""

from .kind import IP_ADAPTER

__all__ = ["IP_ADAPTER"]
