"""Where things live, for the driver, data tasks and workers alike: local or object-storage
directories and files, the storage credentials forwarded to other nodes, and the
errors that name a bad input."""
