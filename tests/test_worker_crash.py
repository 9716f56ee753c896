"""A worker killed with SIGKILL during a flood of uploads (as the kernel's OOM killer kills): gunicorn
replaces it, the uploads it held are lost (a dropped connection, never a wrong answer), and uploads
are answered again within seconds. The scenario with its figures: `python -m bench.load crash`."""

from __future__ import annotations

import threading

from builders import REAL_XRAYS, SHIPPED_MODEL

from bench.load import Server, flood, kill_figures, kill_worker

CLIENTS = 4
RECOVERY_BOUND_S = 6  # measured 1.3-1.9 s on 2 busy cores (ONNX runtime); twice the 3 s for a loaded CI


def test_a_worker_killed_during_a_flood_is_replaced_and_uploads_are_answered_again_within_seconds():
    xray = REAL_XRAYS[0].read_bytes()
    server = Server(str(SHIPPED_MODEL), {"WEB_CONCURRENCY": "1", "PNEUMONIA_RUNTIME": "onnx"})
    results: list[dict] = []
    kills: list[dict] = []
    try:
        server.wait_ready(120)
        killer = threading.Timer(3.0, lambda: kills.append(kill_worker(server)))
        killer.start()
        flood(server, CLIENTS, 10, xray, 0.0, 0.0, record=results)
        killer.join()
        figures = kill_figures(kills[0], results, server.log_text())
        killed_in_log = server.workers_killed()
    finally:
        server.stop()
    killed_at = kills[0]["at"]
    assert killed_in_log == 1
    assert figures["new_worker_s"] is not None and figures["new_worker_s"] < 2, figures
    # An upload whose answer was already written when the signal landed still arrives; the rest are
    # dropped, never answered wrongly.
    assert 1 <= figures["lost"] <= figures["in_flight"] <= CLIENTS, figures
    assert set(figures["in_flight_statuses"]) <= {"connection error", "200"}, figures
    assert figures["answered_again_s"] is not None and figures["answered_again_s"] < RECOVERY_BOUND_S, figures
    not_in_flight = [r for r in results if not r["at"] - r["ms"] / 1000 < killed_at <= r["at"]]
    assert {r["status"] for r in not_in_flight} == {200}  # before the kill, and from the new worker on
    assert sum(r["at"] > killed_at + figures["answered_again_s"] for r in results) >= 5  # it kept serving
