"""storage: what shardlog keeps on disk, and nothing about what it means.

- layout.py      the kernel's `disk` log image and the sync page: offsets and sizes
- errors.py      StoreError (facts only) and the tally a server keeps of those it handled
- statedir.py    the state directory's file names, and the one way a file is replaced
- records.py     CTR records: an instance's constructor string, for a restarted server
- stores.py      where an image persists: a core log's instance file, a disk log's device
- regionmap.py   one instance's bits, mapped from its instance file
- devices.py     resolving a CTR's log device argument
- image.py       reading an image offline, read-only (``shardlog inspect``)

Imports flow down this list (records.py uses statedir.py; regionmap.py uses stores.py;
image.py uses records.py to name an instance).
"""
