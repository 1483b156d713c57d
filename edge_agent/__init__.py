"""Edge agent: runs on every VM. Must never import torch (tests enforce it)."""
