"""fdbroker: a local broker that holds open file descriptors under names and hands them to allowed processes."""

__version__ = "0.1.0"
