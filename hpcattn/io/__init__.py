"""Files: HDF5 reads and atomic result files (`h5io`), input checks (`validate`), and runs
that stream a shard through memory in chunks (`outofcore`)."""
