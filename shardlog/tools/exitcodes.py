"""The exit codes of every ``shardlog`` command, defined once."""

EXIT_OK = 0
EXIT_ERROR = 1  # the command failed: server not running, permission denied, refused, ...
EXIT_USAGE = 2  # bad arguments or bad input
