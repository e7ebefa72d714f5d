"""domainlm: build a domain-specific language model end to end."""

__version__ = "0.1.0"
