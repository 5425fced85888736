"""Names of the store's files and directories (the on-disk protocol; see :mod:`.store`)."""

LATEST_FILE = "LATEST"  # <adapter>/LATEST: newest version's name, rewritten by every publish
PIN_FILE = "ACTIVE"  # <adapter>/ACTIVE: optional pin (rollback); absent = follow the newest
RETIRED_FILE = "RETIRED"  # <adapter>/RETIRED: engines stop serving the adapter
KEEP_FILE = "KEEP"  # <adapter>/<version>/KEEP: gc leaves the version alone
FAILED_PREFIX = "FAILED."  # <adapter>/<version>/FAILED.<instance>.json: that instance refused it
STAGING_DIR = ".staging"  # <adapter>/.staging/: publishes in progress, gc's trash
INSTANCES_DIR = ".instances"  # <root>/.instances/<instance-id>.json
LOCK_FILE = ".lock"  # <adapter>/.lock: the publish lock
