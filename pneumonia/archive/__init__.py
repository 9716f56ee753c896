"""Screening an archive on Ray Data: the rows of `predict --csv` as Parquet files under one folder,
resumable, from one laptop to a cluster (Ray is the optional `archive` extra).

    sources (folders, manifests) ──minus the paths already under DIR──> Ray Data items (path, uri)
    ──read tasks (local files on the driver's node): the bytes (pyarrow's file systems)──> blocks of B files
    ──actors (the model loaded once): the one screening pipeline (BatchScreener.screen_chunk)──>
    one row per block back to the driver: its Parquet file's bytes, counts, images/s, peak memory
    ──driver──> DIR/part-<hash of its paths>.parquet, written whole or not at all

`sources` and `results` need pyarrow only; `pipeline` and `actor` need Ray.
"""
