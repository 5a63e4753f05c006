"""shardlog: a sharded, crash-safe server for the device-mapper userspace dirty log."""

__version__ = "0.1.0"
