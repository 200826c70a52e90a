"""srpo_megatron: SRPO (Sample-Routed Policy Optimization) on Megatron-core and SGLang."""

__version__ = "0.1.0"
