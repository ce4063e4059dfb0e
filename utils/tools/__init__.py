"""Tools around the pipeline: grids of runs (`sweep`) and the throughput benchmark (`bench`)."""
