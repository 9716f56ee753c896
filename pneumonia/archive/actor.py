"""The Ray Data actor: the model loaded once per actor (the ONNX runtime where the export is
present), then, per block of files, the one screening pipeline and the bytes of one Parquet file (the
driver writes it: DIR need not be reachable from the other nodes)."""

from __future__ import annotations

import os
import resource
import socket
import time

from pneumonia.archive.result_files import encode_part, record
from pneumonia.archive.sources import PATH_COLUMN
from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.screening import ScreenedImage, Screening, Tally


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class ScreeningActor:
    """map_batches' callable class: a block of {path, content, read_error} -> one row: the block's
    Parquet file and its stats."""

    def __init__(self, model: str | None, runtime: str | None, chunk_size: int, threads: int):
        import ray

        from pneumonia.serving.classifier import XrayClassifier, default_model_path
        from pneumonia.serving.screening import BatchScreener

        self.chunk_size = chunk_size
        self.classifier = XrayClassifier(model or default_model_path(), runtime, threads=threads)
        self.screener = BatchScreener(self.classifier, names_in_messages=True)  # a row's message names its file
        self.gated = self.classifier.gate is not None
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()  # which raylet: how the pool spread over the cluster
        self.loaded_mb = peak_rss_mb()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        started = time.perf_counter()
        rows = self.screen(list(batch[PATH_COLUMN]), list(batch["content"]), list(batch["read_error"]))
        records = [record(row, self.classifier.thresholds, self.gated) for row in rows]
        part, content = encode_part(records)
        tally = Tally()
        for row in rows:
            tally.count(row.outcome)
        return {
            "part": np.asarray([part]),
            "content": np.asarray([content], dtype=object),
            "rows": np.asarray([len(rows)]),
            **{outcome: np.asarray([getattr(tally, outcome)]) for outcome in Outcome},
            "seconds": np.asarray([time.perf_counter() - started]),
            "actor": np.asarray([self.actor]),
            "node": np.asarray([self.node]),
            "loaded_mb": np.asarray([self.loaded_mb]),
            "peak_rss_mb": np.asarray([peak_rss_mb()]),
        }

    def screen(self, paths: list[str], contents: list, read_errors: list[str]) -> list[ScreenedImage]:
        """The rows in the block's order: screen_chunk a chunk at a time for the files that were read."""
        rows: dict[int, ScreenedImage] = {}
        readable = []
        for index, (path, content, error) in enumerate(zip(paths, contents, read_errors)):
            if error:
                rows[index] = ScreenedImage(str(path), Screening.failed(str(error)))
            else:
                readable.append((index, str(path), bytes(content)))
        for start in range(0, len(readable), self.chunk_size):
            chunk = readable[start : start + self.chunk_size]
            screened = self.screener.screen_chunk([(name, content) for _, name, content in chunk])
            for (index, _, _), row in zip(chunk, screened):
                rows[index] = row
        return [rows[index] for index in range(len(paths))]
