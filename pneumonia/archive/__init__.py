"""Screening an archive on Ray Data: the rows of `predict --csv` as Parquet files under one folder,
resumable, from one laptop to a cluster (Ray is the optional `archive` extra).

    sources (folders, manifests) ──minus the paths already under DIR──> Ray Data items (path, uri)
    ──read tasks: the bytes (pyarrow's file systems)──> blocks of B files
    ──actors (the model loaded once): the one screening pipeline (BatchScreener.screen_chunk)──>
    one Parquet file per block, named by a hash of its paths, written whole or not at all
    ──> a stats row per block back to the driver: counts, images/s, peak memory per actor

`sources` and `results` need pyarrow only; `pipeline` and `actor` need Ray.
"""
